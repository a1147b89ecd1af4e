"""One GPU session's kernel check: correctness in bf16/fp16 at real model shapes, then microbenchmarks.

Correctness (the issue's bar): ||out - ref|| / ||ref|| <= 1e-2 against the torch references over a
grid mixing decode and prefill lengths, block sizes and GQA ratios (Llama-3.1-8B, Qwen2.5-7B,
SmolLM2-135M head layouts), outputs poisoned with NaN before every run, no NaN allowed; a CUDA
graph replay of decode attention with changed lengths; the pytest suite of tests/kernels when pytest
is importable. Then the microbenchmarks of bench/kernels.py and the measured copy / matmul ceilings.
Writes bench/results/<date>-<device>-<commit>-kernels.json (and a copy under $OUT when set).

    python -m appliance_bench.gpu_check [--smoke] [--skip-bench]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import time

import torch

TOLERANCE = 1e-2

# (name, Hq, Hkv, D)
HEAD_LAYOUTS = [("llama-3.1-8b", 32, 8, 128), ("qwen2.5-7b", 28, 4, 128), ("smollm2-135m", 9, 3, 64),
                ("mha-64", 8, 8, 64)]
# (name, new tokens per sequence, cached context before them)
LENGTH_MIXES = {
    "decode": ([1] * 8, [0, 1, 15, 16, 17, 100, 511, 1000]),
    "decode-long (split-KV)": ([1, 1], [3000, 7]),
    "prefill": ([1, 37, 300], [0, 0, 0]),
    "mixed": ([1, 1, 64, 1, 129, 1], [40, 1023, 0, 7, 300, 2]),
}
SMOKE_LAYOUTS = [("tiny-gqa", 4, 2, 32)]
SMOKE_MIXES = {"mixed": ([1, 3, 1], [5, 2, 20])}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.isnan().any():
        return float("nan")
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def check_attention(device: torch.device, dtypes: list[torch.dtype], smoke: bool) -> list[dict[str, object]]:
    from appliance_bench.kernels import make_paged_batch
    from appliance_kernels import attention, reference

    rows = []
    layouts, mixes = (SMOKE_LAYOUTS, SMOKE_MIXES) if smoke else (HEAD_LAYOUTS, LENGTH_MIXES)
    for dtype in dtypes:
        for layout, hq, hkv, d in layouts:
            for block_size in (16,) if smoke else (16, 32):
                for mix, (q_lens, ctx_lens) in mixes.items():
                    torch.manual_seed(len(rows))
                    b = make_paged_batch(q_lens, ctx_lens, hq, hkv, d, block_size, dtype, device)
                    args = (b["q"], b["k_cache"], b["v_cache"], b["block_tables"], b["seq_lens"],
                            b["query_start_loc"], d**-0.5)
                    ref = reference.paged_attention_ref(*args)
                    out = torch.full_like(b["q"], float("nan"))
                    attention.paged_attention(*args, max_query_len=b["max_query_len"], max_seq_len=b["max_seq_len"],
                                              out=out)
                    errs = {"launcher": relative_error(out, ref)}
                    if b["max_query_len"] == 1:
                        for splits in (1, 4):
                            out.fill_(float("nan"))
                            attention.paged_attention_with_splits(*args, max_query_len=1, num_splits=splits, out=out)
                            errs[f"splits={splits}"] = relative_error(out, ref)
                    for variant, err in errs.items():
                        rows.append({"kernel": "paged_attention", "dtype": str(dtype), "layout": layout,
                                     "block_size": block_size, "mix": mix, "variant": variant, "rel_err": err,
                                     "ok": err <= TOLERANCE})
    return rows


def check_graph_replay(device: torch.device) -> dict[str, object]:
    """Capture decode attention once, replay with other lengths: proves no host reads in the launcher."""
    from appliance_bench.kernels import make_paged_batch
    from appliance_kernels import attention, reference

    b = make_paged_batch([1, 1, 1], [40, 2000, 300], 32, 8, 128, 16, torch.bfloat16, device)
    seq_lens = b["seq_lens"].clone()
    args = (b["q"], b["k_cache"], b["v_cache"], b["block_tables"], seq_lens, b["query_start_loc"], 0.088)
    out = torch.empty_like(b["q"])
    attention.paged_attention(*args, max_query_len=1, max_seq_len=4096, is_decode_only=True, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention.paged_attention(*args, max_query_len=1, max_seq_len=4096, is_decode_only=True, out=out)
    seq_lens.copy_(torch.tensor([17, 1500, 301], dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    err = relative_error(out, reference.paged_attention_ref(*args))
    return {"kernel": "paged_attention", "variant": "cuda-graph replay", "rel_err": err, "ok": err <= TOLERANCE}


def check_layers(device: torch.device, dtypes: list[torch.dtype], smoke: bool) -> list[dict[str, object]]:
    from appliance_kernels import activation, attention, norm, reference, rotary

    t, h, inter, hq, hkv, d = (6, 64, 96, 4, 2, 32) if smoke else (777, 4096, 14336, 32, 8, 128)
    rows = []
    for dtype in dtypes:
        def add(kernel: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = dtype) -> None:
            err = relative_error(out, ref)
            rows.append({"kernel": kernel, "dtype": str(dtype), "rel_err": err, "ok": err <= TOLERANCE})

        x = torch.randn((t, h), dtype=dtype, device=device)
        res = torch.randn_like(x)
        w = torch.randn(h, dtype=dtype, device=device)
        out, new_res = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        norm.rms_norm(x, w, 1e-5, res, out=out, residual_out=new_res)
        ref, ref_res = reference.rms_norm_ref(x, w, 1e-5, res)
        add("rms_norm", out, ref)
        add("rms_norm residual", new_res, ref_res)

        gate_up = torch.randn((t, 2 * inter), dtype=dtype, device=device)
        out = torch.full((t, inter), float("nan"), dtype=dtype, device=device)
        activation.silu_and_mul(gate_up, out=out)
        add("silu_and_mul", out, reference.silu_and_mul_ref(gate_up))

        qkv = torch.randn((t, (hq + 2 * hkv) * d), dtype=dtype, device=device)
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
        positions = torch.randint(0, 8192, (t,), device=device)
        inv_freq = 1.0 / (500000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        freqs = torch.outer(torch.arange(8192, dtype=torch.float32, device=device), inv_freq)
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        q_out, k_out = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
        rotary.rotary_embedding(positions, q, k, cos_sin, q_out=q_out, k_out=k_out)
        q_ref, k_ref = reference.rotary_ref(positions, q, k, cos_sin)
        add("rotary q", q_out, q_ref)
        add("rotary k", k_out, k_ref)

        blocks = -(-t // 16) + 4
        caches = [torch.full((blocks, 16, hkv, d), float("nan"), dtype=dtype, device=device) for _ in range(4)]
        slots = torch.randperm(blocks * 16, device=device)[:t]
        slots[::5] = -1
        attention.store_kv(k, v, caches[0], caches[1], slots)
        reference.store_kv_ref(k, v, caches[2], caches[3], slots)
        same = all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(caches[:2], caches[2:],
                                                                                    strict=True))
        rows.append({"kernel": "store_kv", "dtype": str(dtype), "rel_err": 0.0 if same else float("nan"), "ok": same})
    return rows


def run_pytest(repo: pathlib.Path) -> dict[str, object]:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"ran": False, "reason": "pytest is not installed here"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           str(repo / "tests" / "kernels")], capture_output=True, text=True, cwd=repo, timeout=600)
    tail = proc.stdout.strip().splitlines()[-3:]
    return {"ran": True, "returncode": proc.returncode, "summary": tail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU under the Triton interpreter")
    parser.add_argument("--skip-bench", action="store_true", help="correctness only")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.smoke = True
    device = torch.device("cuda" if cuda else "cpu")
    # The interpreter computes bf16 dots wrongly: on CPU check fp32 only.
    dtypes = [torch.bfloat16, torch.float16] if cuda else [torch.float32]
    repo = pathlib.Path(__file__).resolve().parent.parent
    started = time.perf_counter()

    checks = check_attention(device, dtypes, args.smoke) + check_layers(device, dtypes, args.smoke)
    if cuda:
        checks.append(check_graph_replay(device))
    failed = [c for c in checks if not c["ok"]]
    worst = max((c["rel_err"] for c in checks), key=lambda e: float("inf") if e != e else e)
    print(f"correctness: {len(checks) - len(failed)}/{len(checks)} ok, worst rel err {worst:.2e}")
    for c in failed:
        print("  FAILED", c)
    pytest_result = run_pytest(repo) if cuda else {"ran": False, "reason": "no CUDA (CI runs the suite itself)"}
    print("pytest tests/kernels:", pytest_result)

    payload: dict[str, object] = {"correctness": checks, "correctness_failed": len(failed), "pytest": pytest_result}
    if not args.skip_bench:
        from appliance_bench import kernels, roofline

        rows = kernels.run_kernel_benchmarks(device, args.smoke)
        payload["microbench"] = [dataclasses.asdict(r) for r in rows]
        if cuda:
            payload["copy_bytes_per_s"] = roofline.measure_copy_bytes_per_s(device)
            payload["matmul_bf16_flops_per_s"] = roofline.measure_matmul_flops_per_s(device)
            print(f"measured copy {payload['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
                  f"{payload['matmul_bf16_flops_per_s'] / 1e12:.0f} TFLOP/s")
        print(kernels.format_table(rows))
    payload["wall_s"] = time.perf_counter() - started
    if cuda or not args.smoke:
        from appliance_bench.results import write_result

        path = write_result(payload, "kernels")
        print("wrote", path)
        if os.environ.get("OUT"):
            shutil.copy(path, pathlib.Path(os.environ["OUT"]) / path.name)
    ok = not failed and (not pytest_result.get("ran") or pytest_result.get("returncode") == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
