"""The typed config tree of a bigllm run.

One YAML file (see configs/) fills `RunConfig`; dotted overrides on the command line change
any leaf (`parallel.tp=2`). Everything that can be checked without a process group is checked
in `validate()` / `validate_world()`, so bad layouts fail before any rank starts talking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from bigllm.errors import ConfigError


@dataclass
class RopeScalingConfig:
    """RoPE scaling as transformers defines it (`rope_scaling` / `rope_parameters` in config.json)."""

    # "none"; "linear": positions divided by `factor`; "llama3": Llama 3.1/3.2's frequency-dependent
    # scaling (low frequencies divided by `factor`, high ones kept, a smooth band between).
    type: Literal["none", "linear", "llama3"] = "none"
    factor: float = 1.0
    # llama3 only: the band edges as fractions of the original context, and that context's length.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def validate(self) -> None:
        if self.type != "none" and self.factor <= 0:
            raise ConfigError(f"model.rope_scaling.factor must be positive, got {self.factor}")
        if self.type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError("model.rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                              f"{self.low_freq_factor} and {self.high_freq_factor}")


@dataclass
class MoEConfig:
    """Mixture of experts on megatron-core's MoE layer (`TopKRouter`, token dispatcher, experts):
    each MoE layer's MLP becomes `num_experts` SwiGLU experts of which a router picks `top_k`
    per token, plus an optional shared expert every token passes through."""

    # Routed experts per MoE layer; 0 is a dense model.
    num_experts: int = 0
    top_k: int = 2
    # Inner size of each routed expert's SwiGLU; null means model.ffn_hidden_size.
    ffn_hidden_size: Optional[int] = None
    # Inner size of the shared expert (DeepSeek, Qwen2-MoE); 0 means none.
    shared_expert_ffn_hidden_size: int = 0
    # Tokens an expert takes per micro-batch, as a multiple of its even share (top_k x tokens /
    # experts); the rest are dropped (their MoE output is zero, the residual carries them).
    # null is dropless: every routed token is computed.
    capacity_factor: Optional[float] = None
    # Router scores: "softmax" (Mixtral, Qwen3-MoE) or "sigmoid" (DeepSeek-V3).
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    # The top-k weights sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob). With softmax, false takes
    # the top k of the softmax over all experts (megatron's moe_router_pre_softmax). Sigmoid
    # scores are always normalised (megatron's rule for top_k > 1).
    normalize_top_k: bool = True
    # Multiplies the top-k weights (DeepSeek-V3's routed_scaling_factor); null is 1.
    top_k_scaling: Optional[float] = None
    # Load balancing (megatron's moe_router_load_balancing_type): "aux_loss" over each micro-batch
    # (Switch / GShard), "seq_aux_loss" per sequence (DeepSeek-V3), "global_aux_loss" over the
    # step's micro-batches and data-parallel ranks, "none". Weighted by aux_loss_coeff.
    load_balancing: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    aux_loss_coeff: float = 0.0
    # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores when
    # choosing experts, moved by expert_bias_update_rate after each step towards the even load.
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3
    # Router z-loss (ST-MoE): keeps the router's logits small; 0 disables.
    z_loss_coeff: float = 0.0
    # 0-based layers whose MLP stays dense (model.ffn_hidden_size), e.g. [0, 1, 2] for
    # DeepSeek-V3's first three; all other layers are MoE layers.
    dense_layers: list[int] = field(default_factory=list)
    # megatron's token dispatcher: "allgather" (any device) or "alltoall" (CUDA: fewer bytes moved
    # at large expert parallelism).
    dispatcher: Literal["allgather", "alltoall"] = "allgather"

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def validate(self, num_layers: int) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"model.moe.num_experts must be >= 0 (0 = dense), got {self.num_experts}")
        if not self.enabled:
            return
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"model.moe.top_k={self.top_k} must be between 1 and model.moe.num_experts="
                              f"{self.num_experts}")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size <= 0:
            raise ConfigError(f"model.moe.ffn_hidden_size must be positive, got {self.ffn_hidden_size}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"model.moe.capacity_factor={self.capacity_factor} cannot hold any token; use a "
                              "positive factor (1.0 = each expert's even share) or null for dropless routing")
        if self.score_function == "softmax" and self.top_k == 1 and self.normalize_top_k:
            raise ConfigError("model.moe.top_k=1 with softmax routing needs model.moe.normalize_top_k=false (the "
                              "weight of one normalised expert is always 1 and teaches the router nothing)")
        if self.score_function == "sigmoid" and not self.normalize_top_k and self.top_k > 1:
            raise ConfigError("model.moe.normalize_top_k=false is for softmax routing: megatron always normalises "
                              "sigmoid top-k weights; set model.moe.normalize_top_k=true")
        if self.expert_bias and self.score_function != "sigmoid":
            raise ConfigError("model.moe.expert_bias=true needs model.moe.score_function=sigmoid (megatron adds the "
                              "bias to sigmoid scores only, as DeepSeek-V3 does)")
        if self.load_balancing == "none" and self.aux_loss_coeff:
            raise ConfigError(f"model.moe.aux_loss_coeff={self.aux_loss_coeff} with model.moe.load_balancing=none; "
                              "choose aux_loss, seq_aux_loss or global_aux_loss, or set the coefficient to 0")
        for name in ("aux_loss_coeff", "z_loss_coeff", "expert_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.moe.{name} must be >= 0, got {getattr(self, name)}")
        bad = [i for i in self.dense_layers if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"model.moe.dense_layers {bad} are not layers of a {num_layers}-layer model "
                              f"(0-based: 0..{num_layers - 1})")


@dataclass
class ModelConfig:
    """A Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention; optional q/k/v biases
    (Qwen2), per-head q/k RMSNorm (Qwen3), a head size apart from hidden / heads, RoPE scaling."""

    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    # Grouped-query attention: key/value heads; null means = num_attention_heads (plain MHA).
    num_kv_heads: Optional[int] = None
    # Size of each attention head; null means hidden_size / num_attention_heads. Qwen3, Gemma and
    # others use heads whose total (heads x head_dim) is not the hidden size.
    head_dim: Optional[int] = None
    # SwiGLU inner size; null means Llama's rule: 2/3 * 4h rounded up to a multiple of 64.
    ffn_hidden_size: Optional[int] = None
    seq_length: int = 128
    # The context the model is made for (Hugging Face's max_position_embeddings, kept through
    # `bigllm convert`); null means seq_length. Training and evaluation use seq_length.
    max_position_embeddings: Optional[int] = None
    # Vocabulary size of the model; null means: the tokenizer's size, padded (see below).
    vocab_size: Optional[int] = None
    # The embedding table is padded to a multiple of this times tp (Megatron's convention).
    make_vocab_size_divisible_by: int = 64
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # Biases on the query, key and value projections (Qwen2); no other linear has one.
    qkv_bias: bool = False
    # RMSNorm over each head's query and key, before RoPE (Qwen3's qk-norm; megatron's qk_layernorm).
    qk_norm: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # The Hugging Face family the model converts to and from (`bigllm convert to-hf` writes its
    # model_type and architecture): the features above decide the math, this only the name.
    # Mixture-of-experts models convert as "mixtral" or "qwen3_moe".
    family: Literal["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"] = "llama"
    # Dropout on attention probabilities and on residual branches.
    dropout: float = 0.0
    init_std: float = 0.02
    # Recompute each transformer block in backward (saves activation memory).
    activation_checkpointing: bool = False
    # Mixture of experts (model.moe.num_experts > 0); dense by default.
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """The attention head size d: head_dim, or hidden / heads (the one place this is derived)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return 64 * math.ceil(int(8 * self.hidden_size / 3) / 64)

    @property
    def expert_ffn_size(self) -> int:
        """Inner size of one routed expert (model.moe.ffn_hidden_size, else the dense one)."""
        return self.moe.ffn_hidden_size or self.ffn_size

    def is_moe_layer(self, layer: int) -> bool:
        """Whether 0-based layer `layer` has routed experts (megatron's moe_layer_freq pattern)."""
        return self.moe.enabled and layer not in self.moe.dense_layers

    def validate(self) -> None:
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim "
                              "for heads of another size")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(f"model.head_dim must be positive (or null for hidden / heads), got {self.head_dim}")
        if self.num_attention_heads % self.kv_heads:
            raise ConfigError(f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                              f"model.num_kv_heads={self.kv_heads}")
        for name in ("hidden_size", "num_layers", "num_attention_heads", "seq_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        self.rope_scaling.validate()
        self.moe.validate(self.num_layers)
        if self.family in ("mixtral", "qwen3_moe") and not self.moe.enabled:
            raise ConfigError(f"model.family={self.family} is a mixture-of-experts family; set model.moe.num_experts "
                              "or a dense family (llama, mistral, qwen2, qwen3)")


@dataclass
class DataConfig:
    """Where tokens come from: .bin/.idx prefixes written by `bigllm preprocess`."""

    # Directory holding tokenizer.model (written by `bigllm tokenizer train`).
    tokenizer: str = ""
    # Shard prefixes (PREFIX.bin / PREFIX.idx), blended with `weights`.
    prefixes: list[str] = field(default_factory=list)
    # Blending weights, one per prefix; null means proportional to size (equal weights).
    weights: Optional[list[float]] = None
    # Train/valid/test split of each prefix's documents, Megatron style ("969,30,1").
    split: str = "949,50,1"
    # Sample-index cache directory; null means `<first prefix dir>/cache`.
    cache_dir: Optional[str] = None

    def validate(self) -> None:
        if self.weights is not None and len(self.weights) != len(self.prefixes):
            raise ConfigError(f"data.weights has {len(self.weights)} entries but data.prefixes has "
                              f"{len(self.prefixes)}; give one weight per prefix")
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ConfigError(f"data.split must be three comma-separated numbers like '949,50,1', got '{self.split}'")


@dataclass
class ParallelConfig:
    """How the world is cut: tp x pp x cp x dp = world size (dp is derived)."""

    tp: int = 1
    pp: int = 1
    # Context parallelism (DeepSpeed-Ulysses): each of cp ranks holds s/cp of every sequence, and
    # attention swaps sequence for heads with two all-to-alls, so the activations of a long sequence
    # are divided by cp. Needs the heads and kv-heads of each tp rank divisible by cp.
    cp: int = 1
    # Expert parallelism: each MoE layer's experts are shared out over ep ranks carved from the
    # data-parallel ranks (dp x cp); an expert's gradients are reduced, and its ZeRO state sharded,
    # over the ranks that hold the same experts (dp x cp / ep of them). Needs model.moe.
    ep: int = 1
    # ZeRO stage of the optimizer state sharding (DeepSpeed); pp > 1 allows 0 or 1 only.
    zero_stage: Literal[0, 1, 2, 3] = 0
    # Megatron-style sequence parallelism (needs tp > 1): between the tensor-parallel regions
    # (norms, dropout, residuals) each tp rank holds s/tp of the sequence, which divides that
    # activation memory by tp; all-reduces become reduce-scatter + all-gather of the same volume.
    sequence_parallel: bool = False
    # Timeout of every collective, in seconds; a dead peer fails the run after this.
    timeout_s: float = 600.0

    def validate(self) -> None:
        if self.tp < 1 or self.pp < 1 or self.cp < 1:
            raise ConfigError(f"parallel.tp, parallel.pp and parallel.cp must be >= 1, got tp={self.tp}, "
                              f"pp={self.pp}, cp={self.cp}")
        if self.ep < 1:
            raise ConfigError(f"parallel.ep must be >= 1 (1: no expert parallelism), got {self.ep}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1 (it cuts the sequence over "
                              "the tensor-parallel ranks); set parallel.tp or parallel.sequence_parallel=false")
        if self.pp > 1 and self.zero_stage > 1:
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} cannot be combined with parallel.pp={self.pp}: "
                              "DeepSpeed's pipeline engine supports ZeRO 0 or 1; set parallel.zero_stage=1")


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay (not applied to norms), warmup then decay."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    # Global gradient-norm clipping; 0 disables. Always set explicitly in the DeepSpeed config.
    grad_clip: float = 1.0
    # torch AdamW's kernel: "fused" (one kernel per parameter group and dtype), "foreach" (a few
    # multi-tensor kernels, one full-size temporary), or "auto": fused on CUDA, torch's default
    # elsewhere (a per-tensor loop on the CPU, as earlier bigllm releases ran). Not a schedule
    # setting: a resumed run uses this run's choice.
    implementation: Literal["auto", "fused", "foreach"] = "auto"

    def validate(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} is larger than optim.lr={self.lr}")


@dataclass
class WandbConfig:
    """Weights & Biases logging beside TensorBoard (the `bigllm[wandb]` extra); off while project is null."""

    project: Optional[str] = None
    # The run's display name (default: the run dir's name).
    name: Optional[str] = None
    # "offline" writes RUN_DIR/wandb/ only (`wandb sync` uploads it later); "disabled" logs nothing.
    mode: Literal["online", "offline", "disabled"] = "online"


@dataclass
class TrainConfig:
    """The loop: batch arithmetic, precision, intervals, outputs."""

    micro_batch_size: int = 2
    # Samples per optimizer step over all data-parallel ranks = micro * grad_accum * dp.
    global_batch_size: int = 8
    max_steps: int = 100
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 50
    eval_iters: int = 4  # global batches per validation (Megatron's meaning: the same set at any layout)
    save_interval: int = 0  # 0: save only at the end
    keep_last: int = 2
    # Write checkpoints in the background: the state is copied to host buffers while the next
    # step's forward and backward run, and written by a thread (megatron-core's async checkpoint
    # queue); the checkpoint becomes `latest` once every rank's writer has finished. At most one
    # save is in flight; stopping (signal, wall-clock budget, the end of the run) waits for it.
    # Costs host buffers of a rank's checkpoint share (`bigllm plan` counts them).
    async_save: bool = False
    run_dir: str = "runs/default"
    # Peak dense TFLOP/s of one device, for MFU (e.g. 989 for H100 bf16); null disables MFU.
    peak_tflops: Optional[float] = None
    tensorboard: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Save and exit with code 3 ("requeue me") after this many steps of this launch (Megatron's
    # --exit-interval); null runs to max_steps. The schedule still follows max_steps.
    exit_interval: Optional[int] = None
    # On a non-finite loss or a loss spike: "stop" (exit with an error before the bad step is
    # applied where possible, never saving non-finite weights) or "skip" (drop the bad
    # micro-batch from the step; pp=1 only).
    nan_policy: Literal["stop", "skip"] = "stop"
    # A micro-batch loss above this factor x the running mean of recent losses is a spike;
    # null disables spike detection (non-finite losses are always caught).
    loss_spike_factor: Optional[float] = None
    # Wall-clock budget in seconds: save and exit (code 3, "requeue me") before it runs out.
    max_wall_s: Optional[float] = None
    # Fusing each decoder layer's element-wise chain (RoPE, SwiGLU, residual add + RMSNorm, the
    # copies around attention) with torch.compile of the layer, as torchtitan compiles each block:
    # "auto" compiles on CUDA only, "compile" on any device (the CPU too), "eager" never. Only
    # training compiles (the first step pays the compile: seconds to a minute). Where torch.compile
    # cannot run (a GPU box without a C compiler for triton, say), training runs eager and the
    # runtime line says why. MoE layers and ZeRO-3 runs stay eager. Checkpoints are the same.
    fusion: Literal["auto", "compile", "eager"] = "auto"

    def validate(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "max_steps", "log_interval", "eval_iters"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")


@dataclass
class RunConfig:
    """Everything one `bigllm train` run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def eager_reason(self, device_type: str) -> str | None:
        """train.fusion's rule: None when training compiles its dense decoder layers on a device of
        this type (torch.compile permitting), else why they stay eager. Training and `plan` ask here.
        ZeRO-3 stays eager: DeepSpeed gathers parameters in hooks on every submodule, which dynamo
        traces into the layer (measured on CPU: recompiles in the backward hook until dynamo gives up)."""
        mode = self.train.fusion
        if mode == "eager":
            return "train.fusion=eager"
        if mode == "auto" and device_type != "cuda":
            return f"train.fusion=auto compiles on CUDA only, this is {device_type}"
        if self.parallel.zero_stage == 3:
            return "ZeRO-3's parameter hooks in every module do not compile with the layer"
        return None

    def validate(self) -> None:
        """Checks that need no world size."""
        for section in (self.model, self.data, self.parallel, self.optim, self.train):
            section.validate()
        m, p = self.model, self.parallel
        if m.num_attention_heads % p.tp:
            raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                              f"parallel.tp={p.tp}")
        if m.kv_heads % p.tp:
            raise ConfigError(f"model.num_kv_heads={m.kv_heads} is not divisible by parallel.tp={p.tp}")
        if m.ffn_size % p.tp:
            raise ConfigError(f"model.ffn_hidden_size={m.ffn_size} is not divisible by parallel.tp={p.tp}")
        if p.sequence_parallel and m.seq_length % p.tp:
            raise ConfigError(f"model.seq_length={m.seq_length} is not divisible by parallel.tp={p.tp}, which "
                              "parallel.sequence_parallel=true needs; use a multiple of tp")
        if p.cp > 1:
            check_context_parallel(m, p, m.seq_length)
        if m.num_layers < p.pp:
            raise ConfigError(f"model.num_layers={m.num_layers} is fewer than the parallel.pp={p.pp} "
                              "pipeline stages; use more layers or fewer stages")
        if m.moe.enabled or p.ep > 1:
            check_moe(m, p, self.train.precision)
        if self.train.nan_policy == "skip" and p.pp > 1:
            raise ConfigError("train.nan_policy=skip needs parallel.pp=1 (DeepSpeed's pipeline engine applies the "
                              "whole step at once); use train.nan_policy=stop with pipeline parallelism")


def check_moe(m: ModelConfig, p: ParallelConfig, precision: str) -> None:
    """What megatron's MoE layer and DeepSpeed's expert groups need of the layout."""
    moe = m.moe
    if p.ep > 1 and not moe.enabled:
        raise ConfigError(f"parallel.ep={p.ep} needs a mixture-of-experts model: set model.moe.num_experts, or "
                          "parallel.ep=1 for a dense model")
    if moe.num_experts % p.ep:
        raise ConfigError(f"model.moe.num_experts={moe.num_experts} is not divisible by parallel.ep={p.ep}: each ep "
                          "rank holds an equal share of the experts; use an ep that divides the experts")
    if m.expert_ffn_size % p.tp or (moe.shared_expert_ffn_hidden_size % p.tp):
        raise ConfigError(f"the expert sizes model.moe.ffn_hidden_size={m.expert_ffn_size} and "
                          f"model.moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size} must be "
                          f"divisible by parallel.tp={p.tp} (experts are tensor-parallel like the dense MLP)")
    if p.tp > 1 and not p.sequence_parallel:
        raise ConfigError(f"a mixture-of-experts model at parallel.tp={p.tp} needs parallel.sequence_parallel=true: "
                          "megatron's MoE layer routes each tp rank's slice of the sequence")
    if p.ep > 1 and p.zero_stage in (0, 3):
        raise ConfigError(f"parallel.ep={p.ep} with parallel.zero_stage={p.zero_stage}: expert parallelism runs on "
                          "DeepSpeed's ZeRO-1/2 expert groups (they keep each expert's optimizer state); use "
                          "parallel.zero_stage=1 (2 without pipeline parallelism), or parallel.ep=1")
    if precision == "fp16":
        raise ConfigError("train.precision=fp16 with a mixture-of-experts model: the router's auxiliary losses are "
                          "not scaled with fp16's dynamic loss scale; use train.precision=bf16")


def check_context_parallel(m: ModelConfig, p: ParallelConfig, seq_length: int, seq_name: str = "model.seq_length",
                           cp_name: str = "parallel.cp") -> None:
    """Ulysses gives each cp rank whole heads (of its tp rank's heads) over the whole sequence, and
    each cp rank s/cp of the sequence between the attentions (s/(cp*tp) with sequence parallelism)."""
    heads, kv = m.num_attention_heads // p.tp, m.kv_heads // p.tp
    if heads % p.cp or kv % p.cp:
        raise ConfigError(f"{cp_name}={p.cp} does not divide the attention heads of a tensor-parallel rank: "
                          f"model.num_attention_heads={m.num_attention_heads} / tp={p.tp} = {heads} heads and "
                          f"model.num_kv_heads={m.kv_heads} / tp={p.tp} = {kv} kv-heads; Ulysses gives each cp rank "
                          f"whole heads: choose a cp (or tp) that divides both")
    cut = p.cp * (p.tp if p.sequence_parallel else 1)
    if seq_length % cut:
        what = (f"{cp_name} * parallel.tp = {p.cp} * {p.tp} = {cut} (sequence parallelism)" if p.sequence_parallel
                else f"{cp_name}={p.cp}")
        raise ConfigError(f"{seq_name}={seq_length} is not divisible by {what}: each rank holds an equal slice of "
                          f"the sequence; use a length that is a multiple of {cut}")
