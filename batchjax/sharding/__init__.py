"""Meshes and sharding rules: which parameter axis lives on which mesh axis.

`mesh` builds the `("data", "model")` mesh and its per-replica sub-meshes; `rules` is the table
from logical axes (vocab, embed, heads, kv heads, MLP, ...) to mesh axes that the model step
reads; `tensor_parallel` lays a model's weights out so each device of the `model` axis holds
whole heads and whole MLP columns (Megatron-style), and says clearly when a model cannot be
split over a mesh.
"""
