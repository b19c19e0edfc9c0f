"""(L0, FVE) sweep of the MTC, the single-head MTC and SAE + MTC on a cached layer capture, on
any device, with wall times (the command ``headscope decompose sweep`` captures the layer itself).

The capture is a folder written by ``save_layer_data`` (``benchmarks/decompose.py --cache DIR``
makes one). To run on a machine without the model, carry a smaller file instead:
``--write-carry FILE`` keeps the first ``--train`` and the last ``--eval`` contexts with
resid, attn_out and the pattern's causal half in fp16 (~50 MB for 112 contexts of 128 tokens
at d_model 576); ``--carried FILE`` reads it back.

    .venv/bin/python benchmarks/decompose_sweep.py --cache /tmp/L15 --write-carry l15.safetensors
    python3 benchmarks/decompose_sweep.py --carried l15.safetensors --device cuda --epochs 24 \
        --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from headscope.decompose import LayerData, load_layer_data
from headscope.decompose.sweep import DEFAULT_L1S, format_sweep, mtc_sweep


def write_carry(data: LayerData, n_train: int, n_eval: int, path: Path) -> None:
    N, T = data.ids.shape
    index = torch.cat([torch.arange(n_train), torch.arange(N - n_eval, N)])
    tri = torch.tril_indices(T, T)
    save_file(
        {
            "ids": data.ids[index].contiguous(),
            "resid": data.resid[index].half().contiguous(),  # [n, T, d]
            "attn_out": data.attn_out[index].half().contiguous(),  # [n, T, d]
            "pattern": data.pattern[index][:, :, tri[0], tri[1]]
            .half()
            .contiguous(),  # [n, H, T(T+1)/2]
            "layer": torch.tensor([data.layer]),
        },
        str(path),
    )


def read_carry(path: Path) -> LayerData:
    t = load_file(str(path))
    N, T = t["ids"].shape
    tri = torch.tril_indices(T, T)
    pattern = torch.zeros(N, t["pattern"].shape[1], T, T)  # [N, H, T, T]
    pattern[:, :, tri[0], tri[1]] = t["pattern"].float()
    return LayerData(
        layer=int(t["layer"][0]),
        ids=t["ids"],
        resid=t["resid"].float(),
        resid_post=None,
        attn_out=t["attn_out"].float(),
        pattern=pattern,
        q=None,  # type: ignore[arg-type]  # the MTC reads none of q, k, z
        k=None,  # type: ignore[arg-type]
        z=None,  # type: ignore[arg-type]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cache", type=Path, help="a save_layer_data folder")
    src.add_argument("--carried", type=Path, help="a file written by --write-carry")
    p.add_argument("--write-carry", type=Path, help="write the carried subset and stop")
    p.add_argument("--train", type=int, default=96, help="training contexts (the first ones)")
    p.add_argument("--eval", type=int, default=16, help="held-out contexts (the last ones)")
    p.add_argument("--l1s", type=float, nargs="+", default=list(DEFAULT_L1S))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--n-features", type=int, default=512)
    p.add_argument("--k-moved", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="write the MTCSweep JSON here")
    args = p.parse_args()

    if args.cache:
        data = load_layer_data(args.cache)
        if args.write_carry:
            write_carry(data, args.train, args.eval, args.write_carry)
            print(f"wrote {args.write_carry}")
            return
        N = data.n_contexts
        data = data.select(torch.cat([torch.arange(args.train), torch.arange(N - args.eval, N)]))
    else:
        data = read_carry(args.carried)
    train, test = data.to(args.device).split(args.eval)
    t0 = time.perf_counter()
    sweep = mtc_sweep(
        train,
        test,
        l1s=tuple(args.l1s),
        n_features=args.n_features,
        k_moved=args.k_moved,
        epochs=args.epochs,
        model_name="default",
        log=lambda m: print(m, flush=True),
    )
    print(format_sweep(sweep))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{name}: {time.perf_counter() - t0:.1f} s wall")
    if args.out:
        args.out.write_text(json.dumps(sweep.model_dump(), indent=2))


if __name__ == "__main__":
    main()
