"""A megatron-core GPT model on its own TP/PP layout, one job per file:

    build.py    how a model is built: ModelConfig -> TransformerConfig, layer spec, HiddenGPT
    weights.py  canonical weight names, shard / unshard, layout-free init, full state dicts
    batch.py    how a batch is packed: token-budget micro-batches, DP balance, masks / THD
    forward.py  how a step runs: the pipeline-schedule scaffold -> kernels -> gathered results
    inference.py the forward of one stage as plain torch ops (decode with a KV cache, scoring)
    transfer.py how hidden states move from one model's layout to another's ranks; heads re-sharded
    vocab.py    vocab-parallel top-k and log-probs at chosen ids, in plain torch
    distill.py  the student's losses of the full_vocab and top_k estimators

The public facade is gopd_mega.models.ShardedGPT.
"""
