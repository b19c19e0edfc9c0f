"""Sparse autoencoders: config, model and SAELens-compatible files.

A saved SAE is a folder holding two files, the layout SAELens uses, so SAEs trained here load in
SAELens and SAEs downloaded from SAELens releases load here::

    DIR/cfg.json                  SAEConfig.to_dict(): SAELens keys + headscope keys
    DIR/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
                                  b_dec [d_in], and for jumprelu threshold [d_sae]

SAELens may also leave ``sparsity.safetensors`` (log10 feature density) next to them; it is
ignored here.

The headscope keys SAELens ignores: ``site``, ``layers`` and ``norm_scaling_factor``. SAELens
does not store the activation scale of ``normalize_activations="expected_average_only_in"`` in
``cfg.json``, so before handing such an SAE to SAELens users fold it into the weights with
:meth:`SAE.with_norm_scaling_folded`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from headscope.errors import AlreadyExists, DataError
from headscope.files import atomic_dir, write_tensors, write_text

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"

Architecture = Literal["topk", "standard", "jumprelu"]
Site = Literal["resid", "z", "v", "other"]
Normalization = Literal["none", "expected_average_only_in"]

ARCHITECTURES: tuple[str, ...] = ("topk", "standard", "jumprelu")
SITES: tuple[str, ...] = ("resid", "z", "v", "other")
NORMALIZATIONS: tuple[str, ...] = ("none", "expected_average_only_in")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

_SITE_HOOKS = {
    "resid": "blocks.{layer}.hook_resid_pre",
    "z": "blocks.{layer}.attn.hook_z",
    "v": "blocks.{layer}.attn.hook_v",
}
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_(?:pre|mid|post)|attn\.hook_z|attn\.hook_v)$")

# cfg.json keys this module reads into SAEConfig fields (or regenerates on save). Every other key
# is kept verbatim in SAEConfig.extra so a load -> save round trip does not lose it.
_CONSUMED_KEYS = frozenset(
    {
        "d_in",
        "d_sae",
        "architecture",
        "k",
        "activation_fn",
        "activation_fn_str",
        "activation_fn_kwargs",
        "site",
        "layers",
        "model_name",
        "hook_name",
        "hook_point",
        "hook_layer",
        "hook_point_layer",
        "dtype",
        "apply_b_dec_to_input",
        "normalize_activations",
        "norm_scaling_factor",
    }
)


class SAEFormatError(DataError):
    """A folder or config dict is not a loadable SAE; the message says which file/key is wrong."""


def hook_name_for(site: str, layer: int) -> str:
    """TransformerLens hook name of an SAE site at one layer, e.g. ``blocks.3.attn.hook_z``."""
    if site not in _SITE_HOOKS:
        raise ValueError(
            f"site must be one of {sorted(_SITE_HOOKS)} to derive a hook name, got {site!r}"
        )
    return _SITE_HOOKS[site].format(layer=layer)


def parse_hook_name(hook_name: str) -> tuple[str, tuple[int, ...]]:
    """(site, layers) from a hook name; ``+`` joins the hooks of a multi-layer SAE.

    Hooks other than resid/z/v (e.g. ``blocks.3.hook_mlp_out``) give site ``"other"``.
    """
    site: str | None = None
    layers: list[int] = []
    for part in hook_name.split("+"):
        m = _HOOK_RE.match(part)
        if m is None:
            return "other", tuple(int(x) for x in re.findall(r"blocks\.(\d+)\.", hook_name))
        part_site = "resid" if m.group(2).startswith("hook_resid") else m.group(2)[-1]
        if site is not None and part_site != site:
            return "other", tuple(layers)
        site = part_site
        layers.append(int(m.group(1)))
    return site or "other", tuple(layers)


def _canonical_dtype(dtype: str) -> str:
    name = dtype.removeprefix("torch.")
    if name not in _DTYPES:
        raise SAEFormatError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return name


@dataclass(frozen=True)
class SAEConfig:
    """How an SAE is shaped and where it reads from.

    ``hook_name`` is derived from ``site`` and ``layers`` when left empty; a multi-layer SAE (e.g.
    the concatenated values of two layers) joins its hooks with ``+``. ``norm_scaling_factor`` is
    the constant the input is multiplied by when ``normalize_activations`` is
    ``"expected_average_only_in"`` (``sqrt(d_in) / E‖x‖``; ``None`` = not known, no scaling,
    which is what SAELens does for such folders). ``extra`` keeps every cfg.json key this class
    does not model, so saving a loaded SAELens SAE writes them back.
    """

    d_in: int
    d_sae: int
    architecture: Architecture = "topk"
    k: int | None = None
    site: Site = "resid"
    layers: tuple[int, ...] = ()
    model_name: str = ""
    hook_name: str = ""
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True
    normalize_activations: Normalization = "none"
    norm_scaling_factor: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.d_in, int) and self.d_in > 0):
            raise SAEFormatError(f"d_in must be a positive int, got {self.d_in!r}")
        if not (isinstance(self.d_sae, int) and self.d_sae > 0):
            raise SAEFormatError(f"d_sae must be a positive int, got {self.d_sae!r}")
        if self.architecture not in ARCHITECTURES:
            raise SAEFormatError(
                f"architecture {self.architecture!r} is not supported; expected one of {ARCHITECTURES}"
            )
        if self.architecture == "topk":
            if self.k is None or not (1 <= int(self.k) <= self.d_sae):
                raise SAEFormatError(
                    f"topk SAE needs 1 <= k <= d_sae={self.d_sae}, got k={self.k!r}"
                )
            object.__setattr__(self, "k", int(self.k))
        else:
            object.__setattr__(self, "k", None)  # k only means something for topk
        if self.site not in SITES:
            raise SAEFormatError(f"site must be one of {SITES}, got {self.site!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEFormatError(
                f"normalize_activations must be one of {NORMALIZATIONS}, got {self.normalize_activations!r}"
            )
        if self.norm_scaling_factor is not None:
            if self.normalize_activations == "none":
                raise SAEFormatError(
                    "norm_scaling_factor is set but normalize_activations is 'none'"
                )
            if not (math.isfinite(self.norm_scaling_factor) and self.norm_scaling_factor > 0):
                raise SAEFormatError(
                    f"norm_scaling_factor must be > 0, got {self.norm_scaling_factor}"
                )
        object.__setattr__(self, "dtype", _canonical_dtype(self.dtype))
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "extra", dict(self.extra))
        if not self.hook_name and self.layers:
            object.__setattr__(
                self,
                "hook_name",
                "+".join(hook_name_for(self.site, layer) for layer in self.layers),
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def scale(self) -> float | None:
        """Factor the raw input is multiplied by before encoding (None: no scaling)."""
        if self.normalize_activations == "expected_average_only_in":
            return self.norm_scaling_factor
        return None

    def to_dict(self) -> dict[str, Any]:
        """cfg.json content: SAELens's flat (pre-6.0, still loadable by 6.x) keys + ours."""
        out: dict[str, Any] = dict(self.extra)
        activation = "topk" if self.architecture == "topk" else "relu"
        out.update(
            {
                "architecture": self.architecture,
                "d_in": self.d_in,
                "d_sae": self.d_sae,
                "dtype": self.dtype,
                "model_name": self.model_name,
                "hook_name": self.hook_name,
                "apply_b_dec_to_input": self.apply_b_dec_to_input,
                "normalize_activations": self.normalize_activations,
                "activation_fn_str": activation,
                "activation_fn_kwargs": {"k": self.k} if self.k is not None else {},
                "site": self.site,
                "layers": list(self.layers),
                "norm_scaling_factor": self.norm_scaling_factor,
            }
        )
        if self.k is not None:
            out["k"] = self.k
        if self.layers:
            out["hook_layer"] = self.layers[0]
        meta_key = next(
            (key for key in ("metadata", "meta") if isinstance(out.get(key), dict)), None
        )
        if meta_key is not None:
            # SAELens >= 6 reads model/hook names from this nested dict; keep it in step with ours.
            meta = dict(out[meta_key])
            meta.update(model_name=self.model_name, hook_name=self.hook_name)
            if self.layers:
                meta["hook_layer"] = self.layers[0]
            out[meta_key] = meta
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SAEConfig:
        """Read our own ``to_dict`` output or any SAELens cfg.json (pre-6.0 flat or 6.x nested)."""
        if not isinstance(d, Mapping):
            raise SAEFormatError(f"config must be a JSON object, got {type(d).__name__}")
        for key in ("d_in", "d_sae"):
            if key not in d:
                raise SAEFormatError(f"config is missing required key {key!r}")
        meta: Mapping[str, Any] = {}
        for key in ("metadata", "meta"):
            if isinstance(d.get(key), Mapping):
                meta = d[key]
                break

        def pick(*keys: str, default: Any = None) -> Any:
            for source in (d, meta):
                for key in keys:
                    if source.get(key) is not None:
                        return source[key]
            return default

        act_fn = d.get("activation_fn_str", d.get("activation_fn"))
        act_kwargs = d.get("activation_fn_kwargs") or {}
        architecture = d.get("architecture") or "standard"
        # Before SAELens had a "topk" architecture, TopK SAEs were "standard" + activation "topk".
        if architecture == "standard" and act_fn == "topk":
            architecture = "topk"
        k = d.get("k", act_kwargs.get("k") if isinstance(act_kwargs, Mapping) else None)

        norm = d.get("normalize_activations", "none")
        if norm is None or norm is False:
            norm = "none"
        elif norm is True:
            norm = "expected_average_only_in"

        hook_name = pick("hook_name", "hook_point", default="")
        parsed_site, parsed_layers = parse_hook_name(hook_name) if hook_name else ("resid", ())
        layers = d.get("layers")
        if layers is None:
            hook_layer = pick("hook_layer", "hook_point_layer")
            layers = parsed_layers or ((int(hook_layer),) if hook_layer is not None else ())

        extra = {key: value for key, value in d.items() if key not in _CONSUMED_KEYS}
        return cls(
            d_in=int(d["d_in"]),
            d_sae=int(d["d_sae"]),
            architecture=cast(Architecture, architecture),
            k=int(k) if k is not None else None,
            site=cast(Site, d.get("site") or parsed_site),
            layers=tuple(layers),
            model_name=pick("model_name", default="") or "",
            hook_name=hook_name,
            dtype=d.get("dtype") or "float32",
            apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)),
            normalize_activations=norm,
            norm_scaling_factor=d.get("norm_scaling_factor"),
            extra=extra,
        )


class SAE(nn.Module):
    """A sparse autoencoder with SAELens parameter names and shapes.

    encode: ``pre = (x·s − b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc`` (``s`` = the config's
    activation scale, 1 when none), then
    topk: ReLU of the k largest pre-activations, zeros elsewhere;
    standard: ReLU;  jumprelu: ``ReLU(pre) · [pre > threshold]`` (as SAELens).
    decode: ``(a @ W_dec + b_dec) / s``.
    """

    def __init__(
        self,
        cfg: SAEConfig,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = cfg.torch_dtype
        # Unit-norm random decoder rows with the encoder as its transpose (Gao et al. 2024, §2.3).
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float32)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(
            w_dec.T.contiguous().to(device=device, dtype=dtype)
        )  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=dtype))  # [d_sae]
        self.W_dec = nn.Parameter(w_dec.to(device=device, dtype=dtype))  # [d_sae, d_in]
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))  # [d_in]
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(
                torch.zeros(cfg.d_sae, device=device, dtype=dtype)
            )  # [d_sae]

    def scale_input(self, x: Tensor) -> Tensor:
        """[..., d_in] raw activations -> [..., d_in] in the SAE's (normalised) input space."""
        x = x.to(self.W_enc.dtype)
        scale = self.cfg.scale
        return x * scale if scale is not None else x

    def pre_activations(self, x: Tensor) -> Tensor:
        """[..., d_in] raw activations -> [..., d_sae] encoder pre-activations."""
        x = self.scale_input(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] raw activations -> [..., d_sae] feature activations (>= 0)."""
        pre = self.pre_activations(x)
        if self.cfg.architecture == "topk":
            assert self.cfg.k is not None
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        if self.cfg.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def decode(self, acts: Tensor) -> Tensor:
        """[..., d_sae] feature activations -> [..., d_in] reconstruction in raw units."""
        out = acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        scale = self.cfg.scale
        return out / scale if scale is not None else out

    def forward(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_in] reconstruction."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def with_norm_scaling_folded(self) -> SAE:
        """A copy whose weights absorb the activation scale s (normalize_activations -> "none").

        W_enc·s, b_dec/s, W_dec/s give the same pre-activations and reconstructions on raw
        input, so SAELens (which does not know s) computes the same thing.
        """
        scale = self.cfg.scale
        cfg = replace(self.cfg, normalize_activations="none", norm_scaling_factor=None)
        out = _sae_from_state(cfg, {name: t.clone() for name, t in self.state_dict().items()})
        if scale is not None:
            out.W_enc.mul_(scale)
            out.W_dec.div_(scale)
            out.b_dec.div_(scale)
        return out


def _sae_from_state(cfg: SAEConfig, state: dict[str, Tensor]) -> SAE:
    """An SAE holding exactly these tensors (no random init: built on the meta device)."""
    with torch.device("meta"):
        sae = SAE(cfg)
    sae.load_state_dict(state, assign=True)
    return sae


def _expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    shapes = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (cfg.d_sae,)
    return shapes


def save_sae(sae: SAE, path: str | os.PathLike[str]) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` into folder ``path``; returns it.

    A new folder appears complete or not at all (written beside it, then renamed). Into an
    existing folder each file is replaced atomically, weights first, then cfg.json; other files
    there are left alone.
    """
    path = Path(path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in sae.state_dict().items()}
    cfg_text = json.dumps(sae.cfg.to_dict(), indent=2)

    def write(folder: Path) -> None:
        write_tensors(folder / WEIGHTS_FILENAME, tensors, metadata={"format": "pt"})
        write_text(folder / CFG_FILENAME, cfg_text + "\n")

    if not path.exists():
        with atomic_dir(path) as tmp:
            write(tmp)
    elif path.is_dir():
        write(path)  # file by file: the folder may hold features.json and reports too
    else:
        raise AlreadyExists(f"{path} exists and is not a folder")
    return path


def load_sae(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    dtype: str | None = None,
) -> SAE:
    """Load an SAE folder written by :func:`save_sae` or by SAELens (``SAE.save_model``).

    ``dtype`` overrides the stored one. Raises :class:`SAEFormatError` naming the missing file,
    key or mismatched shape.
    """
    path = Path(path)
    if not path.is_dir():
        raise SAEFormatError(f"SAE folder {path} does not exist or is not a folder")
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for required in (cfg_path, weights_path):
        if not required.is_file():
            raise SAEFormatError(f"SAE folder {path} has no {required.name}")
    try:
        cfg_dict = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise SAEFormatError(f"{cfg_path} is not valid JSON: {err}") from err
    cfg = SAEConfig.from_dict(cfg_dict)
    if dtype is not None:
        cfg = replace(cfg, dtype=dtype)
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise SAEFormatError(f"{weights_path} is not a readable safetensors file: {err}") from err

    if cfg.architecture == "jumprelu" and "threshold" not in state and "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
    # SAELens wrote an all-ones scaling_factor into some releases; it is a no-op.
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise SAEFormatError(
            f"{weights_path} has a non-trivial 'scaling_factor' (finetuning scaling), which is not supported"
        )
    expected = _expected_shapes(cfg)
    missing = [name for name in expected if name not in state]
    if missing:
        raise SAEFormatError(
            f"{weights_path} is missing tensor(s) {missing} for a {cfg.architecture} SAE"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise SAEFormatError(
            f"{weights_path} has unexpected tensor(s) {unexpected} for a {cfg.architecture} SAE"
        )
    for name, shape in expected.items():
        got = tuple(state[name].shape)
        if got != shape:
            hint = " (stored transposed?)" if got == shape[::-1] else ""
            raise SAEFormatError(
                f"{weights_path}: {name} has shape {list(got)}, expected {list(shape)} "
                f"from cfg.json (d_in={cfg.d_in}, d_sae={cfg.d_sae}){hint}"
            )
    state = {name: t.to(device=device, dtype=cfg.torch_dtype) for name, t in state.items()}
    return _sae_from_state(cfg, state)
