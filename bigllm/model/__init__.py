"""The model: its math, its structure and its sizes, apart from how it is parallelised.

    llama       the decoder's layers (Embedding, Block, FinalNorm, Head) and the loss, on megatron-core's
                tensor-parallel layers; megatron's TransformerConfig of a ModelConfig
    layers      the layer spec bigllm gives megatron's TransformerLayer: SDPA core attention (Ulysses
                under context parallelism), RMSNorm
    build       the layers placed on a layout: CausalLM (pp = 1) or DeepSpeed's PipelineModule
    init        layout-invariant initialisation (each tensor from the seed and its canonical name)
    structure   canonical names and shapes, tp split rules, pipeline placement: how weights move
                between layouts
    sizes       the vocabulary (real, padded), parameter counts, FLOPs per token
    hf_adapter  Hugging Face Llama names and config <-> canonical ones
"""
