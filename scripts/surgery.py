"""
Surgery on checkpoints: nanochat GPT -> hybrid (create), and hybrid D -> D2 (grow). Logits unchanged.

Create (Mamba blocks inserted; if --new-dim is wider than the source, grown in the same run):
    python -m scripts.surgery --new-dim=2048                       # ~/.cache/nanochat/chatsft_checkpoints/d32
    python -m scripts.surgery --new-dim=2048 --hub karpathy/nanochat-d32
    python -m scripts.surgery --new-dim=256 --src DIR --mamba 2 --mamba-ffn none
Grow:
    python -m scripts.surgery --expand-from=2048 --new-dim=4096 --src DIR [--head-growth add|widen]
Benchmark (writes a synthetic nanochat checkpoint, then runs surgery on it in a child process):
    python -m scripts.surgery --benchmark-synthetic d32

Tensor logic lives in nanochat/surgery.py. Memory: the source is torch.load'ed with mmap=True and
create reuses its tensors as they are, so peak RSS is about the output checkpoint's size (source +
new tensors). The probe builds both models with load_state_dict(assign=True) on those same tensors
(only wte is copied, to fp32), so it needs no second copy: a full-model probe always fits where the
surgery itself fits, and it is exact (no blockwise approximation to document).
The probe: random token ids (fixed seed), fp32, full width; max |dlogit| > --dlogit-tol exits non-zero
and writes nothing.

The result is a checkpoint directory (model_<step>.pt at the source's step, meta_<step>.json with
model_kind "hybrid", the tokenizer files beside them). meta["surgery"]:
    op                   "create" | "grow" | "create+grow"
    source               {path, hub, step, model_kind, n_embd}; args: every CLI argument
    new_param_prefixes   parameter-name prefixes surgery created in the function path (new Mamba blocks,
                         their FFNs, upcycled routers): what phase 1 trains. [] for a pure grow.
    controller_prefixes  ["controllers."] when the model has fresh adaptive controllers
    blocks_added, attention_blocks (source block i -> hybrid block)
    grow                 {from, to, head_growth, head_dim, n_head, n_kv_head, residual_scale, lora_rank,
                         lora_std, seed, controllers_grown, old_index}: old_index[param] is one list
                         of [new_start, length] runs per dim; nanochat.surgery.new_entry_mask turns it into
                         the bool mask of new entries (per-channel learning rates)
    params_before / params_after (state_dict entries by kind), max_abs_dlogit, probe
    previous             the source's own meta["surgery"] (a chain through every earlier surgery)
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import resource

import torch

from nanochat.common import get_base_dir, expand_path, print0, TOKENIZER_FILES, add_runtime_args, run_script
from nanochat.checkpoint_manager import (CheckpointError, resolve_checkpoint, load_meta, model_kind_of, get_model_kind, config_from_dict,
                                         model_path, clean_state_dict, save_checkpoint, list_steps, load_torch_file, copy_tokenizer_files)
from nanochat.gpt import GPTConfig
from nanochat.hybrid_gpt import HybridConfig
from nanochat import surgery



def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Create a hybrid from a nanochat GPT, or grow a hybrid's width")
    p.add_argument("--new-dim", type=int, default=None, help="width of the result (required except for --benchmark-synthetic)")
    p.add_argument("--expand-from", type=int, default=None, help="grow: the source hybrid's width (checked)")
    p.add_argument("--src", type=str, default=None, help="checkpoint directory or model_<step>.pt file")
    p.add_argument("--hub", type=str, default=None, help="Hugging Face repo id, e.g. karpathy/nanochat-d32")
    p.add_argument("--step", type=int, default=None, help="source step (default: the latest)")
    p.add_argument("--dst", type=str, default=None, help="output directory (default <base_dir>/hybrid_checkpoints/<tag>_<D>)")
    p.add_argument("--overwrite", action="store_true", help="replace checkpoints already in --dst")
    # create
    p.add_argument("--pattern", type=str, default="AM", help="layer pattern tiled over the blocks (A attention, M Mamba)")
    p.add_argument("--mamba", type=int, default=1, choices=(1, 2), help="Mamba version of the new blocks")
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--d-conv", type=int, default=4)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--mamba-headdim", type=int, default=64, help="Mamba-2 head size")
    p.add_argument("--mamba-ngroups", type=int, default=1, help="Mamba-2 B/C groups (growth multiplies them by D2/D)")
    p.add_argument("--mamba-ffn", type=str, default="dense", choices=("dense", "none", "moe"), help="FFN of the new Mamba blocks")
    p.add_argument("--upcycle-moe", action="store_true", help="turn the source MLPs into MoEs of copied experts")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--expert-dim", type=int, default=0, help="0: the MLP hidden size")
    p.add_argument("--moe-top-k", type=int, default=1)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="confidence gates + width predictor, fresh init (default: HybridConfig's default)")
    p.add_argument("--exit-stride", type=int, default=1)
    p.add_argument("--width-levels", type=str, default="", help="comma-separated widths (default: doubling up to the width)")
    # grow
    p.add_argument("--head-growth", type=str, default="add", choices=("add", "widen"))
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the A@B init of new reading weights")
    p.add_argument("--lora-std", type=float, default=0.01, help="std of A and B")
    p.add_argument("--seed", type=int, default=0, help="seed of every new tensor")
    # checks
    p.add_argument("--probe-tokens", type=int, default=64, help="tokens per row of the 2-row probe batch")
    p.add_argument("--probe-seed", type=int, default=1234)
    p.add_argument("--dlogit-tol", type=float, default=1e-4, help="max |dlogit| allowed (fp32)")
    p.add_argument("--skip-tokenizer", action="store_true", help="do not look for / copy tokenizer files")
    p.add_argument("--benchmark-synthetic", type=str, default=None, metavar="dN",
                   help="write a synthetic nanochat checkpoint of depth N (d32: 1.9B params) and time surgery on it")
    p.add_argument("--bench-dir", type=str, default=None, help="where the benchmark writes (default: a temp dir, removed after)")
    add_runtime_args(p)  # --debug, --threads, --require-kernels (read by run_script)
    return p.parse_args(argv)


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def download_hub(repo_id, step=None):
    """Snapshot of a hub repo into <base_dir>/hub/<owner>--<name> (resumable); returns that directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, HfHubHTTPError
    local = os.path.join(get_base_dir(), "hub", repo_id.replace("/", "--"))
    patterns = None if step is None else [f"model_{step:06d}.pt", f"meta_{step:06d}.json", *TOKENIZER_FILES]
    try:
        return snapshot_download(repo_id, local_dir=local, allow_patterns=patterns)
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        raise CheckpointError(f"cannot download {repo_id} from the Hugging Face hub ({type(e).__name__}: {e}). "
                              f"Check the repo id and the network (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}), "
                              f"or download it elsewhere and pass --src DIR") from e


def load_source(path, step=None):
    """(state, meta, checkpoint_dir, step): state loaded with mmap=True (pages are read on use)."""
    ckpt_dir, step = resolve_checkpoint(path, step)
    meta = load_meta(ckpt_dir, step)
    kind = model_kind_of(meta)
    get_model_kind(kind)  # unknown kinds stop here with the list of known ones
    if kind not in ("gpt", "modern", "hybrid"):
        raise CheckpointError(f"surgery takes a nanochat GPT, Oct-2025 or today's (create), or a hybrid (grow) "
                              f"checkpoint; {ckpt_dir} holds {kind!r}")
    state = load_torch_file(model_path(ckpt_dir, step), "cpu", mmap=True)
    return clean_state_dict(state), meta, ckpt_dir, step


def find_tokenizer(ckpt_dir):
    """The directory holding the tokenizer files: the checkpoint's, else <base_dir>/tokenizer; a clear error if
    neither has both."""
    tried = [ckpt_dir, os.path.join(get_base_dir(), "tokenizer")]
    for d in tried:
        if all(os.path.isfile(os.path.join(d, f)) for f in TOKENIZER_FILES):
            return d
    raise CheckpointError(f"tokenizer files {TOKENIZER_FILES} not found together in {tried}; "
                          "put them next to the checkpoint (or train one with scripts.tok_train), or pass --skip-tokenizer")


def default_tag(ckpt_dir, hub, width):
    """d32 from .../chatsft_checkpoints/d32, karpathy/nanochat-d32 or .../hybrid_checkpoints/d32_2048."""
    name = hub.split("/")[-1] if hub else os.path.basename(os.path.normpath(ckpt_dir))
    m = re.search(r"(d\d+)$", name)
    if m:
        return m.group(1)
    m = re.fullmatch(r"(.+)_(\d+)", name)
    return m.group(1) if m and int(m.group(2)) == width else name


def parse_levels(s):
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--width-levels must be comma-separated integers, got {s!r}") from e


def main(argv=None):
    args = parse_args(argv)
    if args.benchmark_synthetic:
        return benchmark_synthetic(args.benchmark_synthetic, argv if argv is not None else sys.argv[1:], args.bench_dir)
    if args.new_dim is None:
        raise SystemExit("--new-dim is required")
    if args.src and args.hub:
        raise SystemExit("give --src or --hub, not both")
    t0 = time.time()
    base = get_base_dir()
    grow_only = args.expand_from is not None

    # ---- source
    if args.hub:
        src_path = download_hub(args.hub, args.step)
    elif args.src:
        src_path = args.src
    elif grow_only:
        src_path = os.path.join(base, "hybrid_checkpoints", f"d32_{args.expand_from}")
    else:
        src_path = os.path.join(base, "chatsft_checkpoints", "d32")
    src_state, src_meta, ckpt_dir, step = load_source(src_path, args.step)
    kind = model_kind_of(src_meta)
    if grow_only and kind != "hybrid":
        raise SystemExit(f"--expand-from grows a hybrid checkpoint, but {ckpt_dir} holds a {kind!r}: "
                         "run create first (--new-dim without --expand-from creates, and grows if wider)")
    if not grow_only and kind not in ("gpt", "modern"):
        raise SystemExit(f"{ckpt_dir} already holds a {kind!r} model: to grow it pass --expand-from=<its width>")
    if kind == "gpt":
        src_config = surgery.gpt_config_from_meta(src_meta, src_state)
    elif kind == "modern":  # today's nanochat: its features move onto the hybrid's blocks (surgery_modern)
        src_config = config_from_dict(get_model_kind(kind)[0], src_meta["model_config"])
    else:
        src_config = HybridConfig.from_dict(src_meta["model_config"])
    D = src_config.n_embd
    if grow_only and args.expand_from != D:
        raise SystemExit(f"--expand-from={args.expand_from} but the source {ckpt_dir} has n_embd={D}")
    if args.new_dim < D:
        raise SystemExit(f"--new-dim={args.new_dim} is narrower than the source width {D}: surgery never shrinks")
    if grow_only and args.new_dim == D:
        raise SystemExit(f"--new-dim={args.new_dim} equals the source width: nothing to grow")
    tokenizer_dir = None if args.skip_tokenizer else find_tokenizer(ckpt_dir)
    levels = parse_levels(args.width_levels) or None
    dst = expand_path(args.dst) if args.dst else os.path.join(
        base, "hybrid_checkpoints", f"{default_tag(ckpt_dir, args.hub, D)}_{args.new_dim}")
    if os.path.isdir(dst) and list_steps(dst) and not args.overwrite:
        raise SystemExit(f"{dst} already holds checkpoints {list_steps(dst)}; pass --overwrite or another --dst")

    # ---- surgery
    record = {"source": {"path": ckpt_dir, "hub": args.hub, "step": step, "model_kind": kind, "n_embd": D},
              "args": vars(args), "new_param_prefixes": [], "controller_prefixes": [], "blocks_added": [],
              "previous": src_meta.get("surgery")}
    state, config = src_state, src_config
    if kind in ("gpt", "modern"):
        hybrid_kwargs = dict(mamba_version=args.mamba, d_state=args.d_state, d_conv=args.d_conv, expand=args.expand,
                             mamba_headdim=args.mamba_headdim, mamba_ngroups=args.mamba_ngroups,
                             num_experts=args.num_experts, expert_dim=args.expert_dim, moe_top_k=args.moe_top_k,
                             capacity_factor=args.capacity_factor, exit_stride=args.exit_stride)
        if args.adaptive is not None:
            hybrid_kwargs["adaptive"] = args.adaptive
        if levels and args.new_dim == D:
            hybrid_kwargs["width_levels"] = levels
        create = surgery.create_hybrid if kind == "gpt" else surgery.create_hybrid_from_modern
        state, config, info = create(src_state, src_config, layer_pattern=args.pattern, mamba_ffn=args.mamba_ffn,
                                     upcycle_moe=args.upcycle_moe, seed=args.seed, **hybrid_kwargs)
        record.update(new_param_prefixes=info["new_param_prefixes"], controller_prefixes=info["controller_prefixes"],
                      blocks_added=info["blocks_added"], attention_blocks=info["attention_blocks"])
        record["op"] = "create"
    if args.new_dim > D:
        state, config, ginfo = surgery.grow(state, config, args.new_dim, head_growth=args.head_growth,
                                            lora_rank=args.lora_rank, lora_std=args.lora_std, seed=args.seed,
                                            width_levels=levels)
        record["grow"] = ginfo
        record["op"] = "create+grow" if kind in ("gpt", "modern") else "grow"
        if config.adaptive:
            record["controller_prefixes"] = ["controllers."]

    # ---- what changed, and the probe
    before, after = surgery.params_by_kind(src_state), surgery.params_by_kind(state)
    print0(f"source: {ckpt_dir} step {step} ({kind}, n_embd {D}, {src_config.n_layer} blocks)")
    print0(f"result: hybrid, n_embd {config.n_embd}, {config.n_layer} blocks (pattern {config.layer_pattern!r}, "
           f"FFN {config.ffn_pattern!r}), {len(record['blocks_added'])} blocks added")
    print0(f"{'params':<12}{'before':>16}{'after':>16}")
    for k in before:
        print0(f"{k:<12}{before[k]:>16,}{after[k]:>16,}")
    idx = surgery.probe_tokens(src_config.vocab_size, args.probe_tokens, args.probe_seed)
    cast_cache = {}  # create shares wte between source and result: one fp32 copy
    src_model = surgery.model_from_state(kind, src_config, src_state, cast_cache)
    dst_model = surgery.model_from_state("hybrid", config, state, cast_cache)
    dlogit = surgery.max_abs_logit_diff(src_model, dst_model, idx)
    del src_model, dst_model, cast_cache
    print0(f"max |dlogit| on a {tuple(idx.shape)} probe (fp32): {dlogit:.3e} (tolerance {args.dlogit_tol:.0e})")
    if not dlogit <= args.dlogit_tol:
        raise SystemExit(f"surgery changed the logits by {dlogit:.3e} > {args.dlogit_tol:.0e}; nothing was written")
    record.update(params_before=before, params_after=after, max_abs_dlogit=dlogit,
                  probe={"shape": list(idx.shape), "seed": args.probe_seed, "dtype": "float32"})

    # ---- write
    os.makedirs(dst, exist_ok=True)
    if args.overwrite:
        for s in list_steps(dst):
            for f in (f"model_{s:06d}.pt", f"meta_{s:06d}.json"):
                os.remove(os.path.join(dst, f))
    meta = {"model_kind": "hybrid", "model_config": config.to_dict(), "step": step, "surgery": record}
    save_checkpoint(dst, step, state, meta)
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, dst, overwrite=True)
    dt, rss = time.time() - t0, peak_rss_gib()
    print0(f"wrote {dst} (step {step}) in {dt:.1f}s, peak RSS {rss:.2f} GiB")
    return {"dst": dst, "step": step, "op": record["op"], "max_abs_dlogit": dlogit, "params_before": before,
            "params_after": after, "blocks_added": record["blocks_added"], "n_embd": [D, config.n_embd],
            "time_s": dt, "peak_rss_gib": rss, "tokenizer_files": list(TOKENIZER_FILES) if tokenizer_dir else []}


# -----------------------------------------------------------------------------
# Benchmark on a synthetic nanochat checkpoint

def write_synthetic_nanochat(out_dir, depth, vocab_size=65536, seed=0, device="cpu"):
    """A nanochat Oct-2025 checkpoint of random weights (wte bf16, the rest fp32) at nanochat's depth
    rule (n_embd = 64*depth, heads of 128); returns its size in bytes. device: where the random numbers
    are drawn (a GPU is much faster at d32; the values then differ from the CPU's for the same seed)."""
    cfg = GPTConfig.from_depth(depth, vocab_size=vocab_size).to_dict()
    D = cfg["n_embd"]
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).cpu()
    state = {"transformer.wte.weight": randn(vocab_size, D).bfloat16()}
    for i in range(depth):
        for name, shape in (("attn.c_q", (D, D)), ("attn.c_k", (D, D)), ("attn.c_v", (D, D)), ("attn.c_proj", (D, D)),
                            ("mlp.c_fc", (4 * D, D)), ("mlp.c_proj", (D, 4 * D))):
            state[f"transformer.h.{i}.{name}.weight"] = randn(*shape) * D ** -0.5
    state["lm_head.weight"] = randn(vocab_size, D) * D ** -0.5
    save_checkpoint(out_dir, 0, state, {"step": 0, "model_config": cfg})
    del state
    return os.path.getsize(model_path(out_dir, 0))


def benchmark_synthetic(tag, argv, bench_dir=None):
    m = re.fullmatch(r"d(\d+)", tag)
    if not m:
        raise SystemExit(f"--benchmark-synthetic takes dN (e.g. d32), got {tag!r}")
    import tempfile
    root = expand_path(bench_dir) if bench_dir else tempfile.mkdtemp(prefix="surgery_bench_")
    src, dst = os.path.join(root, "src"), os.path.join(root, "dst")
    try:
        t0 = time.time()
        size = write_synthetic_nanochat(src, int(m.group(1)))
        print0(f"synthetic {tag} checkpoint: {size / 2**30:.2f} GiB written in {time.time() - t0:.1f}s")
        # the surgery runs in a child so its peak RSS is its own (RUSAGE_CHILDREN), not the writer's
        passed, skip = [], False
        for a in argv:
            if skip:
                skip = False
            elif a in ("--benchmark-synthetic", "--bench-dir", "--src", "--dst", "--hub"):
                skip = True
            elif not a.startswith(("--benchmark-synthetic=", "--bench-dir=", "--src=", "--dst=", "--hub=")):
                passed.append(a)
        if not any(a.startswith("--new-dim") for a in passed):
            passed.append(f"--new-dim={64 * int(m.group(1))}")
        cmd = [sys.executable, "-m", "scripts.surgery", "--src", src, "--dst", dst, "--skip-tokenizer", "--overwrite", *passed]
        t0 = time.time()
        subprocess.run(cmd, check=True)
        dt = time.time() - t0
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        out_size = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst) if f.endswith(".pt"))
        print0(f"surgery: {dt:.1f}s, peak RSS {rss / 2**30:.2f} GiB = {rss / size:.2f}x the source checkpoint "
               f"(output {out_size / 2**30:.2f} GiB)")
        return {"tag": tag, "checkpoint_bytes": size, "output_bytes": out_size, "time_s": dt, "peak_rss_bytes": rss,
                "rss_ratio": rss / size}
    finally:
        if not bench_dir:
            shutil.rmtree(root)


if __name__ == "__main__":
    run_script(main)
