"""Typed configuration schema: the single source of defaults.

Hydra composes `conf/` groups on top of these dataclasses (registered in
`longtrain_launch.store`); the library only ever sees the typed objects. Field names are
the user-facing contract (`parallel.tp=`, `data.seq_len=`, ...): rename nothing.

Over 450 lines on purpose: every config group, each field with the comment that becomes its
line of docs/config-reference.md, in one file a user reads top to bottom.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class ModelConfig:
    """Llama-family decoder shape. Defaults are the `tiny` preset."""

    # a label for logs and the --check report (the `model=` preset sets it)
    name: str = "tiny"
    # embedding rows; at least the tokenizer's vocabulary (data.tokenizer)
    vocab_size: int = 512
    # model width
    hidden_size: int = 128
    # width of the SwiGLU MLP
    intermediate_size: int = 384
    # decoder layers
    num_layers: int = 4
    # query heads; parallel.tp must divide them
    num_heads: int = 4
    # key/value heads (GQA: num_heads is a multiple); parallel.tp must divide them
    num_kv_heads: int = 2
    # None -> hidden_size // num_heads
    head_dim: Optional[int] = None
    # RMSNorm epsilon
    norm_eps: float = 1e-5
    # the output head reuses the input embedding matrix
    tie_embeddings: bool = False
    # Qwen2-style biases on the q/k/v projections
    qkv_bias: bool = False
    # the context length the model claims (a schedule, or an extension with a rope.scaling,
    # raises it to the longest training length)
    max_position_embeddings: int = 4096
    # std of the normal weight initialization of a model trained from scratch
    init_std: float = 0.02
    # Per-layer attention kind, repeated over the layers: L = linear (lightning attention),
    # S = softmax, e.g. "LLLS"; or a linear:softmax ratio, "3:1" = "LLLS", "7:1". Empty: every
    # layer softmax, or every layer linear with attention=lasp1|lasp2 ("Linear-Llama").
    layer_pattern: str = ""
    # linear layers: feature map on q and k (silu | elu1 | identity) and per-head decay
    # (slopes: lambda_h = exp(-s_h) with s_h ALiBi's slopes, as Lightning Attention, i.e.
    # 2^(-8h/H) for H a power of two; slopes_by_layer: s_h scaled by 1 - l / (L - 1) + 1e-5 on
    # layer l of L, as TransNormerLLM; none: no decay)
    linear_feature_map: str = "silu"
    # slopes | slopes_by_layer | none (see linear_feature_map)
    linear_decay: str = "slopes"


@dataclass
class S2Config:
    """attention=s2 (S2-Attention): per-head strided context shards, block-sparse."""

    # tokens per block (a power of two >= 16; data.seq_len / (2 * cp) must be a multiple)
    block_size: int = 64
    # every head sees the `local_blocks` most recent blocks (its own included) ...
    local_blocks: int = 4
    # ... and beyond them every `vert_stride`-th block, at a phase that depends on the head
    vert_stride: int = 8
    # the same phase for every head (then only dense heads/layers see the rest)
    homo_head: bool = False
    # the last this-many heads of each sparse layer attend densely
    num_dense_heads: int = 0
    # dense layers: the first `dense_first`, and every `dense_every`-th (0: none)
    dense_first: int = 2
    # see dense_first
    dense_every: int = 4


@dataclass
class AttentionConfig:
    # softmax: dense | ring | ulysses | ulysses_ring | allgather (K/V all-gathered over CP) |
    # s2 (S2-Attention, block-sparse; attention.s2);
    # linear attention layers: lasp1 (state passed point to point) | lasp2 (one AllGather)
    backend: str = "dense"
    # with backend=lasp1|lasp2, the softmax layers of a hybrid model (model.layer_pattern):
    # allgather (LASP-2H) | ring | dense (cp=1 only)
    softmax: str = "allgather"
    # the block-sparse pattern of backend=s2
    s2: S2Config = field(default_factory=S2Config)
    # ulysses_ring: size of the all-to-all (head) dimension; the ring spans cp / ulysses_degree.
    # 0 -> ulysses: all of cp; ulysses_ring: 2.
    ulysses_degree: int = 0
    # Parity canary: at step 0 and every N steps recompute the first softmax layer's attention
    # exactly on sampled query blocks (memory independent of the length) and fail if the
    # context-parallel result differs by more than check_tol (0 disables).
    check_every: int = 0
    # None -> 1e-4 in fp32, 2e-2 in bf16 (relative to the largest reference value)
    check_tol: Optional[float] = None


@dataclass
class ParallelConfig:
    """Degrees of parallelism; data parallel is derived: dp = world_size / (tp * cp)."""

    # ranks (Ray worker actors) in total
    world_size: int = 2
    # tensor-parallel degree: splits heads and the MLP (megatron-core layers)
    tp: int = 1
    # context-parallel degree: splits the sequence (attention.backend must support it)
    cp: int = 1
    # Megatron sequence parallelism with TP: norms and residuals hold T / tp tokens per TP
    # rank (all-gathered before the column-parallel linears, reduce-scattered after the
    # row-parallel ones). None -> on when tp > 1 and optim.zero is 0 or 3.
    sequence_parallel: Optional[bool] = None
    # auto -> nccl when CUDA is available, else gloo
    backend: str = "auto"
    # Seconds before a collective that never completes raises instead of hanging (the error
    # names the rank, layer and collective; the driver then restarts the group).
    timeout_s: int = 300


@dataclass
class RopeConfig:
    """Rotary embedding and context-extension method (names follow transformers' rope_type)."""

    # none | linear | dynamic_ntk | yarn | llama3 | abf | entropy_abf
    scaling: str = "none"
    # RoPE base
    theta: float = 10000.0
    # context-extension factor of linear, dynamic_ntk, yarn and llama3
    factor: float = 1.0
    # Training length of the checkpoint being extended; None -> model.max_position_embeddings
    original_max_position_embeddings: Optional[int] = None
    # YaRN: dimensions turning more than beta_fast times over the original length keep their
    # frequency, those turning fewer than beta_slow times are interpolated by `factor`, a ramp
    # in between
    beta_fast: float = 32.0
    # see beta_fast
    beta_slow: float = 1.0
    # YaRN: attention scale; None -> 0.1 * ln(factor) + 1, or the ratio of the mscales
    attention_factor: Optional[float] = None
    # YaRN, DeepSeek-style configs: with mscale_all_dim, sets the attention scale
    mscale: Optional[float] = None
    # see mscale
    mscale_all_dim: Optional[float] = None
    # YaRN: round the ramp's ends to whole dimensions (transformers' `truncate`)
    truncate: bool = True
    # llama3: wavelengths beyond original / low_freq_factor are divided by `factor` ...
    low_freq_factor: float = 1.0
    # llama3: ... those below original / high_freq_factor are kept; in between, blended
    high_freq_factor: float = 4.0
    # entropy_abf: the first this-many layers keep unscaled queries (the paper leaves 2)
    entropy_unscaled_layers: int = 2


@dataclass
class OptimConfig:
    # adamw (the only optimizer)
    name: str = "adamw"
    # peak learning rate, reached after warmup_steps
    lr: float = 3e-3
    # Cosine decays to lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    # linear warmup from 0 to lr
    warmup_steps: int = 20
    # cosine | constant
    schedule: str = "cosine"
    # AdamW's decoupled weight decay, its betas and epsilon
    weight_decay: float = 0.1
    # see weight_decay
    beta1: float = 0.9
    # see weight_decay
    beta2: float = 0.95
    # see weight_decay
    eps: float = 1e-8
    # 0 disables clipping
    grad_clip: float = 1.0
    # Sharding over the CP x DP ranks: 0 none (the plain optimizer); 1 the AdamW state and
    # 2 the gradients as well (DeepSpeed ZeRO-1/2); 3 the parameters too (torch FSDP2: each
    # decoder layer gathered just in time, ZeRO-3 class)
    zero: int = 0
    # the precision gradients are accumulated and summed over CP x DP in: fp32, or param (the
    # parameters' dtype, e.g. bf16: half the bytes on the wire, bf16 rounding in the sum)
    grad_reduce_dtype: str = "fp32"
    # MiB of parameters per gradient bucket: each bucket's all-reduce starts as soon as its
    # gradients are complete, overlapping the rest of the backward (ZeRO-1/2: DeepSpeed's
    # reduce and all-gather buckets, as many fp32 elements)
    grad_bucket_mb: float = 25.0


@dataclass
class DataConfig:
    # synthetic | files (data.path) | hf (data.name): the `data=` group sets it
    source: str = "synthetic"
    # synthetic task: passkey | multikey_needle | assoc_recall
    task: str = "passkey"
    # tokens per training sequence (a multiple of 2 * parallel.cp)
    seq_len: int = 1024
    # Global batch in sequences; split over DP ranks and micro-batches (gradient accumulation).
    batch_size: int = 4
    # sequences per forward/backward on each DP rank
    micro_batch_size: int = 1
    # Document shuffle, upsampling draws, synthetic samples and the order of later epochs.
    seed: int = 0
    # synthetic: pack this many documents into each sequence (document ids mask attention
    # across them, positions restart per document).
    docs_per_seq: int = 1
    # files: a file, a directory (searched recursively) or a glob of .jsonl / .json / .parquet
    # record files and .txt / .md documents
    path: Optional[str] = None
    # hf: a dataset name on the hub (or a local dataset directory), its subset and split
    name: Optional[str] = None
    # see name
    subset: Optional[str] = None
    # see name
    split: str = "train"
    # the record field holding the document text
    text_field: str = "text"
    # a record field naming each document's domain for the upsampling mixture; None: every
    # record file is a domain (plain-text documents: their folder)
    domain_field: Optional[str] = None
    # auto: init.from's tokenizer when it has one (a Hugging Face directory holding tokenizer
    # files, or a native checkpoint trained with one), else byte; "byte"; or a Hugging Face
    # tokenizer directory
    tokenizer: str = "auto"
    # hf: read the dataset as a stream (sequential; a resume re-reads and skips what was used)
    streaming: bool = False
    # stream shuffle buffer, in documents
    shuffle_buffer: int = 10000
    # tokenizer processes of datasets.map; None: min(8, CPU count), 1 for small corpora
    num_proc: Optional[int] = None
    # wrap every document as [BOS] tokens [EOS] (skipped if the tokenizer has no such token)
    add_bos: bool = True
    # see add_bos
    add_eos: bool = True
    # shuffle documents (with data.seed) before packing
    shuffle: bool = True
    # Length upsampling for long-context continual training: within each domain, documents
    # longer than `upsample_threshold` tokens are drawn `upsample_factor` times as often as
    # the others, and the domain keeps its token count (so the domain mix is unchanged).
    # 0 disables.
    upsample_threshold: int = 0
    # see upsample_threshold
    upsample_factor: float = 1.0
    # where tokenized and packed corpora are cached (shared by every rank and node);
    # None: $XDG_CACHE_HOME/longtrain/data (~/.cache/longtrain/data)
    cache_dir: Optional[str] = None
    # steps of micro-batches built ahead by a background thread (0: build in the step)
    prefetch: int = 2
    # synthetic tasks: weight of the answer tokens' loss relative to every other target (the
    # answers are a few tokens of each sequence; a weight > 1 gives retrieval a usable signal
    # early). The reported loss is the weighted mean.
    answer_loss_weight: float = 1.0
    # Set by the driver's preparation: the packed corpus directory workers memory-map.
    packed: Optional[str] = None


@dataclass
class StageConfig:
    """One stage of a progressive length schedule (`train.schedule`)."""

    # the stage's sequence length
    seq_len: int = 1024
    # steps trained in the stage
    steps: int = 100
    # None: keep parallel.cp; a stage may grow CP (data parallelism shrinks to match)
    cp: Optional[int] = None
    # None: keep data.micro_batch_size
    micro_batch_size: Optional[int] = None


@dataclass
class TrainConfig:
    # With a schedule: set to the schedule's total (the stages' steps summed).
    steps: int = 300
    # fp32 | bf16 (bf16 keeps fp32 master weights in the optimizer)
    precision: str = "fp32"
    # auto | triton | torch: which implementation runs the attention and int8 kernels.
    # auto: the Triton kernels on CUDA when triton is importable, else the PyTorch paths;
    # triton / torch force one (triton on CPU only under Triton's interpreter, for tests).
    kernels: str = "auto"
    # torch's seed: the initial weights of a model trained from scratch
    seed: int = 1234
    # The loss runs the LM head and the cross-entropy over chunks of this many positions of
    # the micro-batch, each recomputed in the backward, so the [tokens, vocab] logits and
    # their float32 copy exist one chunk at a time (0: the whole sequence at once).
    loss_chunk: int = 4096
    # Regional torch.compile: each decoder layer's forward is compiled (inductor), fusing the
    # element-wise work around the matmuls (RMSNorm, RoPE, SwiGLU, residual adds); the core
    # attention keeps its own kernels. The first steps pay for the compilation.
    compile: bool = False
    # Write the final weights as a Hugging Face directory (<output_dir>/hf) at the end.
    save_hf: bool = True
    # Progressive length schedule, e.g. 4K -> 16K -> 64K:
    #   train.schedule='[{seq_len:4096,steps:200},{seq_len:16384,steps:100,cp:4}]'
    # Each stage trains `steps` steps at `seq_len` (data.seq_len is the first stage's);
    # empty: one stage of train.steps at data.seq_len.
    schedule: List[StageConfig] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    """Native sharded checkpoints (torch.distributed.checkpoint), reshardable on load."""

    # Save every N steps (0: only at the end); the last step is always saved.
    every: int = 100
    # Newest complete checkpoints kept (older ones are deleted after each save).
    keep: int = 2
    # None: <output_dir>/checkpoints
    dir: Optional[str] = None
    # auto: continue from the newest checkpoint in `dir` if there is one; never; or the path
    # of a checkpoint (or of a checkpoint directory: its newest) - any parallel layout.
    resume: str = "auto"
    # Save at the end of training (the final step).
    save_final: bool = True


@dataclass
class LauncherConfig:
    # local: embedded Ray on this machine; ray: join an existing cluster at `address`
    kind: str = "local"
    # kind=ray: the head's <host>:<port>, or auto (a cluster started on this machine with
    # `ray start`)
    address: Optional[str] = None
    # CPU slots per worker actor (and GPUs per worker when CUDA is used)
    cpus_per_worker: int = 1
    # see cpus_per_worker (0: no GPU)
    gpus_per_worker: int = 0
    # Seconds the driver waits for the worker group before giving up.
    timeout_s: int = 3600
    # kind=ray: seconds to wait for the head at `address` to answer before failing with a
    # message naming it (Ray's own retries would otherwise wait minutes)
    connect_timeout_s: float = 30.0
    # Worker deaths or failed collectives survived: each restart tears the group down and
    # resumes from the newest checkpoint (0: fail at once).
    max_restarts: int = 3


@dataclass
class WandbConfig:
    """Each field left unset (None) is taken from W&B's environment variable when that is set
    (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME, WANDB_RUN_GROUP, WANDB_TAGS,
    WANDB_DIR), else from longtrain's default (mode offline, project longtrain, files under
    output_dir; longtrain.observability.wandb_run)."""

    # online | offline | disabled
    mode: Optional[str] = None
    # W&B project; None: $WANDB_PROJECT, else longtrain
    project: Optional[str] = None
    # team or user; None: $WANDB_ENTITY, else the logged-in user's default
    entity: Optional[str] = None
    # display name; None: $WANDB_NAME, else W&B picks one
    name: Optional[str] = None
    # groups runs in the W&B UI (e.g. the runs of a sweep); None: $WANDB_RUN_GROUP
    group: Optional[str] = None
    # labels to filter runs by, e.g. logging.wandb.tags=[extend,yarn]; None: $WANDB_TAGS
    # (comma-separated), else none
    tags: Optional[List[str]] = None
    # where the run's files go (W&B writes `<dir>/wandb/`); None: $WANDB_DIR, else output_dir
    dir: Optional[str] = None


@dataclass
class LoggingConfig:
    # Weights & Biases
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # log metrics every N steps
    every: int = 1
    # the console progress bar on the driver
    progress: bool = True
    # per-device peak (TFLOP/s) that MFU is measured against; None: the device's dense
    # datasheet peak in the training dtype (longtrain/observability/peaks.py), or where the
    # table has none (CPU, an unknown GPU) a GEMM timed on every device at start; the metric
    # mfu_peak_source says which, and mfu_vs_gemm is MFU against the measured GEMM
    peak_tflops: Optional[float] = None


@dataclass
class MemoryConfig:
    """What the forward keeps for the backward (longtrain.memory)."""

    # none | int8: tensors saved for backward are stored as int8 with one scale per group of
    # `group_size` values (Mesa); the forward itself stays exact
    activations: str = "none"
    # none | selective (core attention recomputed, the SwiGLU product recomputed instead of
    # stored) | full (each decoder layer recomputed from its input)
    checkpointing: str = "none"
    # saved activations go to pinned host memory, asynchronously (GPU; nothing to do on CPU)
    offload: bool = False
    # values per int8 scale (a power of two in [16, 4096])
    group_size: int = 64
    # memory=auto: choose the cheapest policy whose estimate fits `budget_gib` per device
    # (None: the device's memory); the choice and the candidates are printed. Otherwise the
    # pre-flight check warns when the configured policy's estimate exceeds it.
    auto: bool = False
    # GiB per device
    budget_gib: Optional[float] = None


@dataclass
class ClusterConfig:
    """The hardware `--check` predicts the step time on and recommends a layout for
    (longtrain.planning.costmodel); nothing else reads it."""

    # none (no prediction) | h100-8x8-ib400 (8 nodes x 8 H100 SXM, NVLink, one 400 Gb/s
    # InfiniBand NIC per GPU) | h100-1x8 (one such node) | cpu-local (this CPU machine as 2
    # gloo processes, fitted by benchmarks/costmodel.py); the `cluster=` group sets it
    preset: str = "none"
    # Overrides of the preset's fields; nodes * devices_per_node must equal
    # parallel.world_size.
    nodes: Optional[int] = None
    # see nodes
    devices_per_node: Optional[int] = None
    # dense peak of one device in the training dtype, TFLOP/s
    peak_tflops: Optional[float] = None
    # device memory, GiB (memory.budget_gib, when set, wins)
    memory_gib: Optional[float] = None
    # inter-node bandwidth per device, Gbit/s (one direction)
    inter_node_gbit: Optional[float] = None
    # intra-node bandwidth per device, GB/s (one direction)
    intra_node_gbytes: Optional[float] = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # `init.from=<dir>`: a Hugging Face directory or a native checkpoint to take the weights
    # from (not the optimizer: that is `checkpoint.resume`); `init.required` (set by
    # experiment=extend) refuses to start without one. A dict because `from` is a Python
    # keyword and cannot be a dataclass field; unknown keys are still refused.
    init: Dict[str, Any] = field(default_factory=lambda: {"from": None, "required": False})
    # Where run artifacts go; Hydra sets it to its run directory.
    output_dir: str = "outputs/latest"

    @property
    def init_from(self) -> Optional[str]:
        return self.init.get("from")

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.output_dir, "checkpoints")

    @property
    def sequence_parallel(self) -> bool:
        """`parallel.sequence_parallel`, resolved: unset means on when tp > 1 and optim.zero
        is 0 or 3 (DeepSpeed ZeRO-1/2 would not sum the norms' gradients over TP); nothing to
        do at tp = 1."""
        sp = self.parallel.sequence_parallel
        tp = self.parallel.tp
        return tp > 1 and (self.optim.zero in (0, 3) if sp is None else bool(sp))
