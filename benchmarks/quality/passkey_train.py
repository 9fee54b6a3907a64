"""Train the tiny model on the synthetic passkey task from scratch (or from --init) with any
attention config, one process on one device, and print the needle accuracy every --every
steps (64 prompts per length, greedy, depth spread evenly). Used for the S2 quality figures in
BENCHMARKS.md (`benchmarks/quality/s2_passkey.sh` runs the grid on one GPU). Not part of the
package: a plain loop, AdamW, warm-up then constant lr, optional linear cool-down.
"""
import argparse
import json
import os
import time

import torch

def _main(rt, args):
    from longtrain.config.schema import ModelConfig, RopeConfig
    from longtrain.model.llama import LlamaModel
    from longtrain.model.sharding import init_weights, load_canonical, canonical_state_dict
    from longtrain.data.passkey import passkey_sample, prompt
    from longtrain.data.tokenizer import ByteTokenizer
    from safetensors.torch import save_file, load_file
    torch.manual_seed(args.seed)
    dev = rt.device
    mcfg = ModelConfig(**json.loads(args.model))
    rope = RopeConfig(**json.loads(args.rope))
    from longtrain.config.schema import AttentionConfig, S2Config
    from longtrain.attention.base import model_attention
    a = json.loads(args.attention)
    acfg = AttentionConfig(backend=a.get("backend", "dense"), s2=S2Config(**a.get("s2", {})))
    per_layer, lin = model_attention(acfg, mcfg)
    model = LlamaModel(mcfg, rope, attention=per_layer, tp=1, tp_rank=0, device=dev, linear_attention=lin)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    if args.init:
        w = load_file(args.init)
        load_canonical(model, lambda n: w[n].to(dev))
    else:
        init_weights(model, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.95))
    tok = ByteTokenizer()
    def evaluate(L, n=64):
        model.eval(); ok = 0
        with torch.no_grad():
            rows=[]; keys=[]
            for i in range(n):
                p = prompt(length=L, depth=(i + 0.5) / n, seed=1234, index=i, tokenizer=tok)
                ans = tok.encode(p.answer)
                rows.append(p.ids + ans); keys.append((len(p.ids), ans))
            for b in range(0, n, 16):
                x = torch.tensor(rows[b:b+16], device=dev)
                lg = model(x[:, :-1]).argmax(-1)
                for j in range(x.shape[0]):
                    s, ans = keys[b+j]
                    ok += lg[j, s-1:s-1+len(ans)].tolist() == ans
        model.train()
        return ok / n
    t0 = time.time(); idx = 0
    for step in range(args.steps):
        if args.warmup and step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        elif args.cooldown and step >= args.steps - args.cooldown:
            lr = args.lr * (args.steps - step) / args.cooldown
        else:
            lr = args.lr
        for g in opt.param_groups: g["lr"] = lr
        rows=[]; wts=[]
        for b in range(args.batch):
            s = passkey_sample(seq_len=args.seq, seed=args.seed, index=idx, tokenizer=tok); idx += 1
            rows.append(s.ids)
            w = torch.ones(args.seq)
            w[s.answer_start-1:s.answer_start-1+5] = args.aw
            wts.append(w)
        x = torch.tensor(rows, device=dev); w = torch.stack(wts).to(dev)
        logits = model(x[:, :-1])
        loss = (torch.nn.functional.cross_entropy(logits.float().flatten(0,1), x[:,1:].flatten(), reduction="none") * w.flatten()).sum() / w.sum()
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            accs = {L: evaluate(L) for L in args.eval}
            print(f"step {step+1} loss {loss.item():.4f} acc {accs} t {time.time()-t0:.0f}s", flush=True)
    if args.save:
        sd = canonical_state_dict(model)
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, args.save)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="{}")
    ap.add_argument("--rope", default="{}")
    ap.add_argument("--init", default="")
    ap.add_argument("--attention", default="{}")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--save", default="")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--aw", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--cooldown", type=int, default=0)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, nargs="*", default=[256])
    ap.add_argument("--backend", default="gloo")
    args = ap.parse_args()
    from longtrain.parallel.spawn import run_distributed
    run_distributed(_main, world_size=1, backend=args.backend, args=(args,), threads=int(os.environ.get("T", "1")))
