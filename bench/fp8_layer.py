"""One decoder layer's linear shapes (Qwen2.5-14B): bf16 vs fp8 (job/fp8.py), forward and activation grad.

For each of the 14B's four linear shapes (q/o 5120->5120, k/v 5120->1024, gate/up 5120->13824,
down 13824->5120) at one micro-batch's tokens, on NF4 weights (bnb Linear4bit, as QLoRA trains):

- bnb:   the layer's own forward (dequantize + bf16 matmul) and its input gradient
- fp8:   job/fp8.py's forward (dequantize, row-wise e4m3 of W and x, _scaled_mm) and dx
- parts: the bf16 matmul alone, _scaled_mm alone, the row-wise quantization of x (Triton and torch)

Times are medians of CUDA-event timings (triton.testing.do_bench); rel err = ||out - ref|| / ||ref||
against an fp32 product of the same dequantized weight. Writes fp8_layer.json under --out.

    python bench/fp8_layer.py --tokens 40960 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from job import fp8  # noqa: E402

SHAPES = {"q_proj/o_proj": (5120, 5120), "k_proj/v_proj": (5120, 1024), "gate/up_proj": (5120, 13824),
          "down_proj": (13824, 5120)}
COUNT = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}  # a decoder layer's


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=40960)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import bitsandbytes as bnb

    dev = torch.device("cuda")
    ok, why = fp8.available(dev)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  fp8: {ok} ({why})", flush=True)
    torch.manual_seed(0)
    m = args.tokens
    rows, per_layer = [], {"bnb": 0.0, "fp8": 0.0}
    for name, (k, n) in SHAPES.items():
        lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, std=0.02)
        q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
        q = q.to(dev)
        w = fp8.frozen_weight(q).to(torch.bfloat16)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        ref_y = x.detach().float() @ w.float().t()
        ref_dx = g.float() @ w.float()

        def bnb_fwd():
            with torch.no_grad():
                return q(x)

        def bnb_fb():
            y = q(x)
            return torch.autograd.grad(y, x, g)[0]

        fp8_fwd_mod = fp8._fp8_forward.__get__(q)

        def fp8_fwd():
            with torch.no_grad():
                return fp8_fwd_mod(x)

        def fp8_fb():
            y = fp8_fwd_mod(x)
            return torch.autograd.grad(y, x, g)[0]

        xq, xs = fp8.quant_rows(x.detach())
        wq, ws = fp8.quant_rows(w)
        tq, ts = fp8.quant_rows_torch(x.detach())
        same = float((xq.float() == tq.float()).float().mean())
        y8, dx8 = fp8_fwd(), fp8_fb()
        emul = fp8.scaled_mm(xq.cpu(), wq.t().cpu(), xs.cpu(), ws.t().cpu(), torch.float32, True) if m <= 4096 else None
        r = {"shape": name, "in": k, "out": n, "tokens": m,
             "bnb_fwd_ms": bench(bnb_fwd), "bnb_fwd_bwd_ms": bench(bnb_fb),
             "fp8_fwd_ms": bench(fp8_fwd), "fp8_fwd_bwd_ms": bench(fp8_fb),
             "bf16_mm_ms": bench(lambda: x.detach() @ w.t()),
             "scaled_mm_ms": bench(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(),
                                                             out_dtype=torch.bfloat16, use_fast_accum=True)),
             "quant_x_triton_ms": bench(lambda: fp8.quant_rows(x.detach())),
             "quant_x_torch_ms": bench(lambda: fp8.quant_rows_torch(x.detach())),
             "dequant_w_ms": bench(lambda: fp8.frozen_weight(q)),
             "triton_eq_torch_quant": same,
             "rel_err_fp8_y": rel(y8, ref_y), "rel_err_bnb_y": rel(bnb_fwd(), ref_y),
             "rel_err_fp8_dx": rel(dx8, ref_dx), "rel_err_bnb_dx": rel(bnb_fb(), ref_dx),
             "emulated_vs_scaled_mm": rel(emul, y8.float().cpu()) if emul is not None else None}
        flops = 2 * m * k * n
        r["bf16_tflops"] = flops / r["bf16_mm_ms"] / 1e9
        r["fp8_tflops"] = flops / r["scaled_mm_ms"] / 1e9
        rows.append(r)
        per_layer["bnb"] += COUNT[name] * r["bnb_fwd_bwd_ms"]
        per_layer["fp8"] += COUNT[name] * r["fp8_fwd_bwd_ms"]
        print(json.dumps({k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in r.items()}), flush=True)
        del x, g, w, q, xq, tq, wq
        torch.cuda.empty_cache()
    print("\n| shape | bf16 mm ms (TFLOP/s) | scaled_mm ms (TFLOP/s) | quant x ms triton/torch | bnb fwd / fwd+bwd ms | "
          "fp8 fwd / fwd+bwd ms | rel err y fp8/bnb | rel err dx fp8/bnb |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['bf16_mm_ms']:.2f} ({r['bf16_tflops']:.0f}) | {r['scaled_mm_ms']:.2f} ({r['fp8_tflops']:.0f}) | "
              f"{r['quant_x_triton_ms']:.2f}/{r['quant_x_torch_ms']:.2f} | {r['bnb_fwd_ms']:.2f} / {r['bnb_fwd_bwd_ms']:.2f} | "
              f"{r['fp8_fwd_ms']:.2f} / {r['fp8_fwd_bwd_ms']:.2f} | {r['rel_err_fp8_y']:.4f}/{r['rel_err_bnb_y']:.4f} | "
              f"{r['rel_err_fp8_dx']:.4f}/{r['rel_err_bnb_dx']:.4f} |")
    print(f"\none decoder layer's 7 linears, forward + input grad: bnb {per_layer['bnb']:.1f} ms, fp8 {per_layer['fp8']:.1f} ms "
          f"({per_layer['bnb'] / per_layer['fp8']:.2f}x)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_layer.json").write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                                    "argv": sys.argv[1:], "rows": rows, "per_layer_ms": per_layer},
                                                   indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
