"""The per-rule example database: tiny ``(model, inputs)`` pairs exercising every built-in rule.

:data:`EXAMPLES` maps a rule's :attr:`~fxprune.rules.base.Rule.name` to the factories of its examples. The
registry test (``tests/test_rules_registry.py``) runs the masked-reference oracle on every example of every
registered rule, so a rule cannot be added untested; :data:`COVERED_ELSEWHERE` names the rules whose
behaviour is tested by dedicated tests instead (with where). A user rule can register its own examples
with :func:`register_example`.

The examples are test fixtures, kept apart from the op families (PyTorch keeps its per-op sample inputs,
``OpInfo``, apart from the kernels the same way).
"""

from __future__ import annotations

from typing import Callable

from . import attention, exported, layers, shapes
from .layers import Example

__all__ = ["EXAMPLES", "COVERED_ELSEWHERE", "register_example", "examples_for", "Example"]

Factory = Callable[[], Example]

#: rule name -> example factories (fx spellings first, then the torch.export spellings)
EXAMPLES: dict[str, list[Factory]] = {
    # element-wise
    "unary": [layers.ex_unary_fn, exported.ex_unary],
    "unary-module": [layers.ex_unary_module],
    "broadcast": [layers.ex_binary, exported.ex_binary],
    "prelu": [layers.ex_prelu],
    # layers
    "conv": [layers.ex_conv, layers.ex_conv_transpose, layers.ex_grouped_conv, layers.ex_transposed_depthwise],
    "F.conv": [layers.ex_functional_conv],
    "aten.conv": [exported.ex_conv, exported.ex_grouped_conv, exported.ex_functional_conv],
    "linear": [layers.ex_linear],
    "F.linear": [layers.ex_functional_linear],
    "aten.linear": [exported.ex_linear],
    "matmul": [attention.ex_matmul, layers.ex_addmm_param],
    "aten.matmul": [exported.ex_matmul, exported.ex_gpt2_conv1d, exported.ex_addmm_param, exported.ex_mha_masked],
    "einsum": [attention.ex_einsum, exported.ex_einsum],
    "embedding": [layers.ex_embedding],
    "F.embedding": [layers.ex_functional_embedding],
    "aten.embedding": [exported.ex_embedding],
    # norms
    "per_channel_norm": [layers.ex_batchnorm, layers.ex_instancenorm],
    "F.batch_norm": [layers.ex_functional_batchnorm],
    "aten.batch_norm": [exported.ex_batchnorm, exported.ex_instancenorm],
    "group_norm": [layers.ex_groupnorm],
    "F.group_norm": [layers.ex_functional_group_norm],
    "aten.group_norm": [exported.ex_groupnorm],
    "layer_norm": [layers.ex_layernorm],
    "F.layer_norm": [layers.ex_functional_layer_norm],
    "aten.layer_norm": [exported.ex_layernorm],
    "F.normalize": [layers.ex_normalize],
    "local_response_norm": [layers.ex_lrn],
    # reductions
    "reduce": [shapes.ex_reduce, shapes.ex_rms_norm_decomposed],
    "aten.reduce": [exported.ex_reduce, exported.ex_shape, exported.ex_rms_norm_decomposed],
    "dimwise": [shapes.ex_softmax],
    "aten.dimwise": [exported.ex_softmax],
    # reshapes
    "view": [shapes.ex_flatten_view, attention.ex_channel_attention],
    "flatten": [shapes.ex_flatten_view],
    "squeeze": [shapes.ex_getitem, shapes.ex_rms_norm_decomposed],
    "unflatten": [shapes.ex_stack_narrow_repeat],
    "aten.unflatten": [exported.ex_unflatten, exported.ex_mha_masked],
    "aten.view": [exported.ex_mha_packed, exported.ex_gqa, exported.ex_channel_attention],
    "aten.squeeze": [exported.ex_shape],
    "expand": [shapes.ex_expand],
    "expand_as": [shapes.ex_expand],
    "aten.expand": [exported.ex_shape, exported.ex_gqa],
    "repeat": [shapes.ex_stack_narrow_repeat],
    # permutes, indexing
    "permute": [shapes.ex_permute],
    "aten.permute": [exported.ex_shape],
    "permute_within": [shapes.ex_roll],
    "aten.permute_within": [exported.ex_roll, exported.ex_pad],
    "cat": [shapes.ex_cat, exported.ex_cat],
    "stack": [shapes.ex_stack_narrow_repeat, exported.ex_stack_narrow_repeat],
    "split": [shapes.ex_split],
    "aten.split": [exported.ex_split, exported.ex_shape],
    "narrow": [shapes.ex_stack_narrow_repeat],
    "aten.slice": [exported.ex_shape, exported.ex_stack_narrow_repeat],
    "getitem": [shapes.ex_getitem],
    "aten.index_put": [exported.ex_index_put],
    # spatial
    "pool2d": [shapes.ex_pool],
    "aten.pool": [exported.ex_pool, exported.ex_pad],
    "resample": [shapes.ex_resample],
    "pixel_shuffle": [shapes.ex_pixel_shuffle, exported.ex_pixel_shuffle],
    "grid_sample": [shapes.ex_grid_sample, exported.ex_grid_sample],
    "meshgrid": [shapes.ex_grid_sample],
    # attention
    "sdpa": [attention.ex_sdpa, exported.ex_sdpa],
    "repeat_interleave": [attention.ex_repeat_interleave, exported.ex_repeat_interleave],
    "multihead_attention": [attention.ex_mha],
    # creation
    "creation.fill": [shapes.ex_creation],
    "creation.full": [shapes.ex_creation],
    "creation.like": [shapes.ex_creation],
    "creation.values": [shapes.ex_creation],
    "aten.creation": [exported.ex_index_put],
    "aten.fill": [exported.ex_fill],
    "pinned": [exported.ex_pinned],
    "shape_query": [shapes.ex_flatten_view, exported.ex_shape],
}

#: rules tested by dedicated tests instead of an example here (rule name -> where)
COVERED_ELSEWHERE: dict[str, str] = {
    "pool1d": "tests/test_compile.py (1-D pools)",
    "pool3d": "tests/test_coverage (torchvision video models)",
    "softmax2d": "same meaning as dimwise",
    "no_op": "torch._assert in tests/test_compile.py",
    "stochastic": "torchvision StochasticDepth/drop_block in the coverage benchmark",
    "swin._patch_merging_pad": "torchvision swin in the coverage benchmark",
    "swin.shifted_window_attention": "torchvision swin in the coverage benchmark",
    "swin._get_relative_position_bias": "torchvision swin in the coverage benchmark",
    "recurrent": "kept whole (pinned); MACs in tests/test_flops.py",
    "bilinear": "kept whole (pinned); MACs in tests/test_flops.py",
    "F.bilinear": "kept whole (pinned); MACs in tests/test_flops.py",
    "transformer": "MACs of nn.Transformer* leaves in tests/test_flops.py (traced through by fxprune)",
}


def register_example(rule_name: str, factory: Factory) -> None:
    """Add an example for a (user) rule to the database the registry test reads."""
    EXAMPLES.setdefault(rule_name, []).append(factory)


def examples_for(rule_name: str) -> list[Factory]:
    return list(EXAMPLES.get(rule_name, ()))
