"""Analyses of a model's behaviour: BlockFFN activation sparsity."""
from cpm_mobile.exporter.analysis.sparsity import (
    LayerSparsity,
    SparsityProfile,
    profile_sparsity,
    render_table,
    sparsity_metrics,
    write_expert_firing_png,
    write_heatmap_png,
)

__all__ = [
    "LayerSparsity",
    "SparsityProfile",
    "profile_sparsity",
    "render_table",
    "sparsity_metrics",
    "write_expert_firing_png",
    "write_heatmap_png",
]
