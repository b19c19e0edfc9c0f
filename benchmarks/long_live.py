"""Live analysis of one long text on the default model, in one process, side by side.

    python benchmarks/long_live.py [--tokens 8192] [--head L18H6] [--model default]

The text: the default corpus's first documents up to half the length, then the same tokens
again, so an induction head's queries in the second half attend about T/2 tokens back. Prints,
in order and on the same text: the model's own forward pass (fused attention, logits, nothing
kept), the session's analysed state (every layer's q, k, v, z and residual decomposition
captured), the head's attention summary (blocked rows: no T x T pattern), ranking every head
on a long-range (query, key) pair, a QK attribution of that pair and the same on the cached
text, an intervention that removes ``--source`` from the head's keys (the edited layer re-run
in blocks of query rows) and an exact knockout of the head's strongest key at the query (layers
0..the head's re-run in blocks), each with the process's resident memory after it and its
peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def corpus_ids(adapter, n: int):
    """``n`` token ids, BOS first: corpus tokens up to ``n // 2``, then the same ones again."""
    import torch

    from headscope.data.corpus import ensure_default_corpus
    from headscope.data.readers import iter_documents

    half = (n - 1) // 2
    ids: list[int] = []
    for doc in iter_documents(ensure_default_corpus()):
        ids += adapter.tokens.encode(doc.text)[1:]
        if len(ids) >= half:
            break
    body = ids[:half]
    return torch.tensor([adapter.tokens.bos_id, *body, *body][:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--head", default="L18H6")
    ap.add_argument(
        "--source", default="L16H0", help="the component removed from --head's keys (scale 0)"
    )
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()

    import torch

    from headscope.analysis.attend import attend_summary
    from headscope.analysis.attribution import qk_attribution, rank_heads
    from headscope.analysis.intervene import intervene
    from headscope.analysis.knockout import knockout
    from headscope.analysis.session import Session
    from headscope.model import ModelAdapter

    torch.set_grad_enabled(False)
    ad = ModelAdapter.load(args.model)
    session = Session(ad, max_tokens=args.tokens)
    ids = corpus_ids(ad, args.tokens)
    T = ids.shape[0]
    rows: list[tuple[str, float]] = []

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        rows.append((name, time.perf_counter() - t0))
        print(
            f"{name:<52} {rows[-1][1]:8.2f} s   RSS {rss_mb():7.0f} MB   peak {peak_mb():7.0f} MB"
        )
        return out

    print(f"{ad.name}, {T} tokens (the second half repeats the first), head {args.head}")
    print(f"{'after loading':<52} {'':>10}   RSS {rss_mb():7.0f} MB   peak {peak_mb():7.0f} MB")
    timed(
        "model's own forward pass (SDPA, last logits)",
        lambda: ad.model(ids[None], logits_to_keep=1).logits[0, -1],
    )
    key_list = ids.tolist()
    st = timed("analysed state: all layers captured", lambda: session.state(key_list))
    summary = timed(
        f"attention summary of {args.head}", lambda: attend_summary(session, key_list, args.head)
    )
    q = T - 1
    k = q - (T - 1) // 2 + 1  # the token after the query's token's first occurrence
    ranked = timed(f"rank heads on ({q}, {k})", lambda: rank_heads(session, key_list, q, k))
    qk = timed(
        f"QK attribution of {args.head} on ({q}, {k})",
        lambda: qk_attribution(session, key_list, args.head, q, k),
    )
    timed(
        f"QK attribution of {args.head} on ({q - 1}, {k - 1}), cached",
        lambda: qk_attribution(session, key_list, args.head, q - 1, k - 1),
    )
    ranked_row = session.pattern_rows(st, int(args.head[1:].split("H")[0]), q)[1][
        int(args.head.split("H")[1])
    ]
    edit = timed(
        f"intervention: {args.source} out of {args.head}'s keys",
        lambda: intervene(session, key_list, [args.head], args.source, "key", 0.0, q, k),
    )
    change = edit.heads[0]
    print(
        f"  {args.head} on ({q}, {k}): attention {change.attention_before:.3f} -> "
        f"{change.attention_after:.3f}, score {change.score_before:.3f} -> "
        f"{change.score_after:.3f}; next-token KL {edit.kl_divergence:.4f}"
    )
    top_key = max(range(1, q + 1), key=lambda j: float(ranked_row[j]))
    ko = timed(
        f"exact knockout of {args.head}'s top key at {q} ({top_key})",
        lambda: knockout(session, key_list, args.head, q, keys=[top_key]),
    )
    print(
        f"  {args.head} at {q}: knocked {ko.knocked_mass:.3f}; largest moves "
        + ", ".join(f"{m.key} {m.before:.3f}->{m.exact:.3f}" for m in ko.moves[:3])
    )
    far = [(qq, kk) for qq, kk, _ in summary.top_keys if qq - kk > T // 4]
    second = [qq for qq, _, _ in summary.top_keys if qq > T // 2]
    print(
        f"state {st.nbytes / 2**20:.0f} MB ({st.nbytes / T / 1024:.0f} kB per token); "
        f"{args.head}: {len(far)} of {len(summary.top_keys)} listed keys lie more than T/4 back, "
        f"{len(set(second))} second-half queries listed; attention on ({q}, {k}) "
        f"{qk.attention:.3f}, top head there {ranked.heads[0].head} "
        f"{ranked.heads[0].attention:.3f}; terms add up to {qk.total:.5f} vs score {qk.score:.5f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": T, "rows": rows, "peak_mb": peak_mb()}, f, indent=1)


if __name__ == "__main__":
    main()
