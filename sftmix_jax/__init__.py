"""SFTMix instruction tuning in JAX/Flax NNX. Importing it changes no process setting.

Shape letters. A tensor's name ends in its axes, `h_BLD` = batch x length x model width; one
letter has one meaning in every module:

    B  batch rows                       L  sequence (query) length     S  key/value length
    D  model width                      F  MLP width                   V  vocabulary
    N  query heads                      K  key/value heads             G  query heads per K/V head (N/K)
    H  head dim                         h  half a head dim (RoPE)      Q  a block of queries (attention)
    M  confident/unconfident pairs      A  a row's aligned response slots (Mixup)
    R  batch shards (devices' rows)     r  the rows of one shard       T  one shard's rows as one row of tokens
    c  a chunk of positions (fused head)                               X  chunk positions over all rows
    P  prompt length (decoding)         O  new tokens (decoding)       E  examples
    C  replay checkpoints               I  steps of an epoch           2  a pair's two sides
    Z  a packed row's examples (segments, scoring)
    1  a broadcast axis of size 1
"""
