"""Parameter counts of the named presets in ``hub_configs/``."""

from __future__ import annotations

PRESET_NAMES = ("tiny", "default", "large")


def preset_parameter_counts(n_genes: int = 500, num_labels: int = 9) -> dict[str, int]:
    """Trainable parameters of each preset's cell classifier at ``n_genes`` genes and
    ``num_labels`` classes (the roadmap's sizes are quoted at 500 genes and 9 classes)."""
    from .configuration_scrnalf import ScrnaLongformerConfig
    from .modeling_scrnalf import ScrnaLongformerForCellClassification

    counts = {}
    for name in PRESET_NAMES:
        config = ScrnaLongformerConfig.from_preset(name, n_genes=n_genes, num_labels=num_labels)
        model = ScrnaLongformerForCellClassification(config)
        counts[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def print_preset_table(n_genes: int = 500, num_labels: int = 9) -> None:
    from .configuration_scrnalf import ScrnaLongformerConfig

    if n_genes < 1 or num_labels < 1:
        raise ValueError(f"--n-genes and --num-labels must be positive, got {n_genes} and {num_labels}.")
    counts = preset_parameter_counts(n_genes, num_labels)  # before printing: no half-printed table on an error
    print(f"| preset | d_model | depth | heads | mlp_ratio | parameters ({n_genes} genes, {num_labels} classes) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, count in counts.items():
        config = ScrnaLongformerConfig.from_preset(name)
        print(f"| {name} | {config.d_model} | {config.depth} | {config.n_heads} | {config.mlp_ratio:g} | {count:,} |")
