#!/usr/bin/env python3
"""PyTorch / transformers peer of the CUDA backend (run by device-check.sh on the GPU machine).

Correctness: DeepseekV3ForCausalLM loads tests/fixtures/tiny-v3 in float32 on the GPU; its
logits for the fixture prompt are compared with `moescope-cli forward --backend cuda --json`
(F32 device weights) and with expected.json, within --atol (1e-3).
Speed (--speed): the same class at DeepSeek-V2-Lite sizes with random BF16 weights made on the
device, timed for a 512-token prefill and 64 greedy decode steps at batch 1: the peer of
`moescope-cli gpu-bench`.
Prints one JSON object on the last line; exits 1 when a comparison fails.
"""
import argparse
import json
import os
import subprocess
import sys
import time


def our_logits(cli, model_dir, tokens):
    env = dict(os.environ, MOESCOPE_CUDA_WEIGHTS="f32")
    cmd = [cli, "forward", model_dir, "--tokens", ",".join(map(str, tokens)), "--backend", "cuda", "--json"]
    t0 = time.time()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["logits"], time.time() - t0


def correctness(args, torch, transformers):
    with open(os.path.join(args.model, "expected.json")) as f:
        expected = json.load(f)
    tokens = expected["prompt_tokens"]
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to("cuda").eval()
    ids = torch.tensor([tokens], device="cuda")
    with torch.no_grad():
        model(ids)  # warm-up
        torch.cuda.synchronize()
        t0 = time.time()
        hf = model(ids).logits[0].float().cpu()
        torch.cuda.synchronize()
        hf_s = time.time() - t0
    ours, ours_s = our_logits(args.cli, args.model, tokens)
    ours = torch.tensor(ours)
    diff_ours = (hf - ours).abs().max().item()
    pos = expected["main_logits"]["positions"]
    exp = torch.tensor(expected["main_logits"]["logits"])
    diff_expected = (hf[pos] - exp).abs().max().item()
    return {
        "hf_vs_ours_max_abs": diff_ours,
        "hf_vs_expected_max_abs": diff_expected,
        "hf_forward_ms": hf_s * 1e3,
        "ours_cli_seconds_with_load": ours_s,
        "argmax_agree": bool((hf.argmax(-1) == ours.argmax(-1)).all().item()),
        "ok": diff_ours <= args.atol and diff_expected <= args.atol,
    }


def speed(args, torch, transformers):
    cfg = transformers.DeepseekV3Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
        n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=1, topk_group=1,
        num_experts_per_tok=6, first_k_dense_replace=1, norm_topk_prob=False,
        max_position_embeddings=4096, rope_scaling=None)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise directly in BF16 on the device (32 GB, not 64)
    try:
        with torch.device("cuda"):
            model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), device="cuda")
    with torch.no_grad():
        model(prompt[:, :64])
        torch.cuda.synchronize()
        t0 = time.time()
        model(prompt)
        torch.cuda.synchronize()
        prefill = time.time() - t0
        model.generate(prompt[:, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.time()
        model.generate(prompt, max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False)
        torch.cuda.synchronize()
        total = time.time() - t0
    decode = max(total - prefill, 1e-9)
    return {"hf_prefill_tokens_per_s": args.prompt / prefill, "hf_decode_tokens_per_s": args.decode / decode}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--cli", required=True)
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--speed", action="store_true")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    args = p.parse_args()
    import torch
    import transformers

    report = {"torch": torch.__version__, "transformers": transformers.__version__}
    report.update(correctness(args, torch, transformers))
    if args.speed:
        try:
            report.update(speed(args, torch, transformers))
        except Exception as e:  # the speed peer is informative; correctness decides the exit code
            report["speed_error"] = repr(e)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
