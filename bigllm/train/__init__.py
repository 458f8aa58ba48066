"""`bigllm train`: the pretraining loop and the components it runs, one decision each.

    loop          cli_main -> preflight (every check before a process group) -> Trainer.fit: the step
                  loop, and the stop / requeue protocol (exit 3, status.json)
    engine        DeepSpeed's engine from the typed config (bigllm.optim, bigllm.parallel.ds_config),
                  the fp32 gradient norm, the one-line runtime description
    step          one optimizer step: grad_accum micro-batches, one host sync and one collective
    checkpointer  should_save / save / resume (bigllm.checkpoint: DeepSpeed's loader or elastic)
    validator     validation loss at train.eval_interval
    guard         non-finite and spiking losses, judged on the device
    moe           a mixture of experts' router losses, expert-bias updates and load metrics
    logger        console, train_log.jsonl, TensorBoard, W&B; status.json
    metrics       tokens/s, TFLOP/s, MFU, ETA (FLOPs per token from bigllm.model.sizes)
    faults        fault injection for the failure-path tests (BIGLLM_FAULT)
    plot          training curves as a PNG
"""
