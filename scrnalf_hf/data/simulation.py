"""Simulated single-cell RNA-seq with known ground truth.

Simulated data proves mechanics and speed, not biology: it is used to check that models learn
(cell types are separable by logistic regression at a macro-F1 near 0.9 with the defaults), to
test code paths that need ground truth (gene modules, directed regulatory edges, pseudotime,
orthologs, protein levels), and to build atlas-sized files for benchmarks.

Generative model, per cell ``c`` and gene ``g`` (natural-log scale ``eta``):

- every gene has a baseline ``base_log_mean[g]``;
- genes are grouped into modules; each module has one regulator gene and directed edges
  regulator → target with a weight. A cell's module activity is its type's programme plus
  cell-level noise; the regulator's level adds its own noise, and targets follow the
  regulator's realised level times the edge weight, so regulator noise propagates downstream
  and not upstream (the edges are causal, not just correlated);
- every cell type has marker genes raised by ``marker_log_fold_change``;
- optional: a pseudotime ``t ~ U(0, 1)`` that moves trajectory genes linearly; with
  ``trajectory_shape="branching"`` the trajectory also forks at ``branch_point``: past it each
  cell follows one of two branches (``obs["branch"]``: ``stem`` before the fork, then
  ``branch_a`` or ``branch_b`` with probability 1/2), and each branch has its own genes that
  move linearly from the fork to ``t = 1`` in that branch's cells only; a per-batch gene
  shift, a second species whose orthologous genes share the human gene's programme (with a
  per-gene log shift of ``species_shift_sd``); a fraction of those orthologs are one-to-many:
  two mouse paralogs that share the programme and split the expression (shares ``p`` and
  ``1 - p``, ``p ~ U(0.3, 0.7)``), so that their sum behaves like a one-to-one ortholog;
- optional (``n_proteins``): CITE-seq surface proteins, each tied to module genes (see
  "Proteins" below);
- optional (``n_peaks``): ATAC peaks placed near genes whose programme drives their
  accessibility (see "ATAC peaks" below);
- mean count ``m = library_size * exp(eta) / sum_g exp(base_log_mean)``; counts are
  negative binomial (gamma–Poisson, inverse dispersion ``nb_theta``), then technical dropout sets
  a count to zero with probability ``dropout / (1 + m)`` (low-expressed genes drop out most).

Proteins (``n_proteins > 0``). Protein ``p`` reads the programme ``x`` (natural-log effect,
regulator level × edge weight, so it varies continuously from cell to cell) of one module gene
``protein_gene[p]``, and its log level ``eta_p`` is one of three known functions of it, cycling
with ``p``: ``linear`` (``1.5 x``), ``switch`` (``3 sigmoid(6 (x - 0.4))``, a steep threshold)
and ``complex`` (``2 min(x, x')`` with ``x'`` the programme of a second module gene
``protein_partner_gene[p]``: a heterodimer limited by its scarcer subunit). The first
``n_state_proteins`` proteins also rise by ``protein_state_log_fold_change`` in cells of a
hidden state (``obs["protein_state"]``, ``high`` with probability 1/2) that no gene sees, so
``obs["cell_subtype"]`` (cell type × protein state) is told apart by proteins and not by RNA.
Counts are gamma–Poisson around ``30 exp(eta) + 5`` (5: ambient antibody background, inverse
dispersion 20). Stored as ``obsm["protein"]`` (array) with the names in
``uns["protein_names"]``, as scvi-tools stores CITE-seq proteins. The protein draws come from
random streams of their own: the RNA of every cell is that of ``n_proteins=0``.

ATAC peaks (``n_peaks > 0``). Genes lie on ``N_CHROMOSOMES`` chromosomes (``chr1`` ...), gene
starts ``gene_spacing`` bases apart in a random order. Each peak sits near one gene
(``peak_gene``): ``atac_driven_fraction`` of the peaks are *driven*, near a gene with a
programme (module or marker gene), the others are background peaks near any gene. Peaks of one
gene alternate downstream / upstream of its start, 3 kb apart, 500 bases wide. A peak is open
in a cell with probability ``sigmoid(b_p + a_p x + log capture_c + e)``: ``x`` the programme of
its gene in that cell (``a_p = 0`` for background peaks, ``U(1.5, 3)`` for driven ones),
``b_p = logit(U(0.05, 0.3))``, a per-cell capture efficiency (log-normal, sd 0.3) and noise
``e ~ N(0, 0.5)``; an open peak has 1 + Poisson(0.3) fragments. Stored as ``obsm["atac"]`` (CSR
fragment counts) with the names (``chr1:1000-1500``) in ``uns["peak_names"]``; the ground truth
(coordinates, gene, driven, slope) in ``uns["simulation"]["peaks"]``. Random streams of their
own: the RNA is that of ``n_peaks=0``. :func:`simulate_multiome` gives a MuData with ``rna`` and
``atac`` modalities.

Cells are drawn in fixed blocks of ``_BLOCK_CELLS`` with one random stream per block, so
:func:`simulate` and :func:`write_simulated_h5ad` give the same cells for the same seed, and
the chunk-wise writer never holds more than one block in memory.

:func:`simulate_two_species` splits a two-species simulation into one AnnData per species plus
the human–mouse ortholog table, the inputs of the cross-species model.

Gene names: human symbols are upper case (``SIMG00012``), mouse symbols title case
(``Simm00012``); one-to-one orthologs share the number. The second paralog of a one-to-many
gene is an extra mouse gene numbered after the ``n_genes`` mouse genes (``Simm00500``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import write_elem

_BLOCK_CELLS = 4096
SPECIES = ("human", "mouse")
TRAJECTORY_SHAPES = ("linear", "branching")
BRANCHES = ("stem", "branch_a", "branch_b")
N_CHROMOSOMES = 5
PEAK_WIDTH = 500
PEAK_STEP = 3000  # bases between successive peaks of one gene


@dataclass(frozen=True)
class SimulationSettings:
    """Everything that defines a simulated dataset except the number of cells.

    Attributes:
        n_genes: genes per species.
        n_cell_types: number of cell types (labels).
        n_modules: gene modules, each with one regulator and directed edges to its targets.
        module_fraction: fraction of genes that belong to a module.
        markers_per_type: marker genes of each cell type (drawn from genes outside modules).
        marker_log_fold_change: natural-log fold change of a cell type's markers.
        module_log_fold_change: natural-log activity of a module a cell type switches on.
        module_noise: standard deviation of a cell's module activity around its type's value.
        regulator_noise: standard deviation of a regulator's own noise, passed to its targets.
        mean_library_size: median expected total counts per cell.
        library_size_sd: standard deviation of log library size across cells.
        nb_theta: negative-binomial inverse dispersion (smaller = more overdispersed).
        dropout: maximal technical dropout probability (reached by genes with mean → 0).
        n_batches: number of batches, each with its own gene-wise shift.
        batch_effect_sd: standard deviation of the per-batch log shift of each gene.
        trajectory: whether cells carry a pseudotime that moves trajectory genes.
        trajectory_fraction: fraction of genes whose level follows pseudotime.
        trajectory_log_fold_change: natural-log change of a trajectory gene from t=0 to t=1
            (of a branch gene, from the branch point to t=1).
        trajectory_shape: ``"linear"`` (one path; every trajectory gene follows t) or
            ``"branching"`` (needs ``trajectory``): the linear genes still follow t in every
            cell, and past ``branch_point`` each cell takes branch a or b, whose own genes
            (``trajectory_fraction`` of the genes per branch, chosen among the genes that do not
            follow t) move only in that branch's cells. The branch draws come from random
            streams of their own: every other gene plan value, each cell's pseudotime, type,
            batch and library size are those of the linear trajectory with the same seed.
        branch_point: pseudotime of the fork, in (0, 1) (``"branching"`` only).
        second_species: whether half of the cells are mouse cells measured on mouse genes.
        ortholog_fraction: fraction of human genes with a mouse ortholog (one-to-one or
            one-to-many); mouse genes without one are mouse-specific: own baseline, no programme.
        one_to_many_fraction: fraction of the human genes *with* an ortholog whose mouse side
            is two paralogs instead of one (needs ``second_species``). The first paralog is the
            gene's usual mouse slot, the second an extra mouse gene appended after the
            ``n_genes`` mouse genes, so mouse then has more genes than human. Both paralogs
            carry the human gene's programme and split its mouse expression into shares ``p``
            and ``1 - p`` with ``p ~ U(0.3, 0.7)`` per gene, so their sum behaves like a
            one-to-one ortholog. Chosen separately among orthologous marker genes and the other
            orthologous genes (``round(fraction × count)`` of each, and at least one marker when
            the fraction is positive), so cell-type markers are always among them. The draws
            come from their own random stream: the rest of the plan and every cell's type,
            batch, species and library size are the same as with ``one_to_many_fraction=0``.
        species_shift_sd: standard deviation of the per-gene natural-log shift of a mouse
            ortholog's baseline from its human gene.
        n_proteins: surface proteins measured alongside RNA (``obsm["protein"]``), each tied to
            module genes by a known function (module docstring, "Proteins").
        n_state_proteins: proteins that also carry the hidden ``protein_state`` (default: one in
            eight, at least one).
        protein_state_log_fold_change: natural-log rise of those proteins in ``high`` cells.
        n_peaks: ATAC peaks measured alongside RNA (``obsm["atac"]``; module docstring, "ATAC
            peaks").
        atac_driven_fraction: fraction of the peaks whose accessibility follows their gene.
        seed: seed of every random draw.
    """

    n_genes: int = 500
    n_cell_types: int = 6
    n_modules: int = 10
    module_fraction: float = 0.5
    markers_per_type: int = 8
    marker_log_fold_change: float = 1.1
    module_log_fold_change: float = 0.5
    module_noise: float = 0.5
    regulator_noise: float = 0.3
    mean_library_size: float = 2000.0
    library_size_sd: float = 0.5
    nb_theta: float = 3.0
    dropout: float = 0.3
    n_batches: int = 1
    batch_effect_sd: float = 0.2
    trajectory: bool = False
    trajectory_fraction: float = 0.1
    trajectory_log_fold_change: float = 2.0
    trajectory_shape: str = "linear"
    branch_point: float = 0.5
    second_species: bool = False
    ortholog_fraction: float = 0.8
    one_to_many_fraction: float = 0.0
    species_shift_sd: float = 0.3
    n_proteins: int = 0
    n_state_proteins: int | None = None
    protein_state_log_fold_change: float = 1.5
    n_peaks: int = 0
    atac_driven_fraction: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_genes < 10:
            raise ValueError(f"n_genes must be at least 10, got {self.n_genes}.")
        if self.n_cell_types < 1 or self.n_modules < 1 or self.n_batches < 1:
            raise ValueError(
                "n_cell_types, n_modules and n_batches must be at least 1, got "
                f"{self.n_cell_types}, {self.n_modules}, {self.n_batches}."
            )
        n_free = self.n_genes - int(self.module_fraction * self.n_genes)
        if self.markers_per_type * self.n_cell_types > n_free:
            raise ValueError(
                f"{self.n_cell_types} cell types × {self.markers_per_type} markers need "
                f"{self.markers_per_type * self.n_cell_types} genes outside modules, but only "
                f"{n_free} of {self.n_genes} are; raise n_genes or lower markers_per_type or "
                "module_fraction."
            )
        if self.trajectory_shape not in TRAJECTORY_SHAPES:
            raise ValueError(f"trajectory_shape must be one of {TRAJECTORY_SHAPES}, got {self.trajectory_shape!r}.")
        if self.trajectory_shape == "branching" and not self.trajectory:
            raise ValueError('trajectory_shape="branching" needs trajectory=True.')
        if not 0.0 < self.branch_point < 1.0:
            raise ValueError(f"branch_point must lie in (0, 1), got {self.branch_point}.")
        if not 0.0 <= self.one_to_many_fraction <= 1.0:
            raise ValueError(f"one_to_many_fraction must be in [0, 1], got {self.one_to_many_fraction}.")
        if self.one_to_many_fraction > 0 and not self.second_species:
            raise ValueError("one_to_many_fraction > 0 needs second_species=True.")
        if self.species_shift_sd < 0:
            raise ValueError(f"species_shift_sd must be non-negative, got {self.species_shift_sd}.")
        if self.n_proteins < 0:
            raise ValueError(f"n_proteins must be non-negative, got {self.n_proteins}.")
        if self.n_state_proteins is not None and not 0 <= self.n_state_proteins <= self.n_proteins:
            raise ValueError(f"n_state_proteins must lie in [0, n_proteins={self.n_proteins}], got {self.n_state_proteins}.")
        if self.n_peaks < 0:
            raise ValueError(f"n_peaks must be non-negative, got {self.n_peaks}.")
        if not 0.0 <= self.atac_driven_fraction <= 1.0:
            raise ValueError(f"atac_driven_fraction must lie in [0, 1], got {self.atac_driven_fraction}.")

    @property
    def state_proteins(self) -> int:
        """Proteins carrying the hidden protein state."""
        if self.n_state_proteins is not None:
            return self.n_state_proteins
        return max(1, self.n_proteins // 8) if self.n_proteins else 0


@dataclass(frozen=True)
class _GenePlan:
    """Gene-level ground truth shared by all cells (one latent gene per human gene)."""

    base_log_mean: np.ndarray  # (genes,)
    module: np.ndarray  # (genes,) int, -1 = no module
    is_regulator: np.ndarray  # (genes,) bool
    edge_weight: np.ndarray  # (genes,) weight of the edge from the module's regulator, 0 if none
    module_regulator: np.ndarray  # (modules,) gene index of each module's regulator
    type_module_activity: np.ndarray  # (cell_types, modules)
    marker_of: np.ndarray  # (genes,) int cell type a gene marks, -1 = none
    trajectory_slope: np.ndarray  # (genes,) log change from t=0 to t=1
    branch_slope: np.ndarray  # (2, genes) log change of branch a / b genes from the fork to t=1
    batch_shift: np.ndarray  # (batches, genes)
    type_proportions: np.ndarray  # (cell_types,)
    # second species: mouse gene j is the ortholog of human gene mouse_ortholog_of[j], or -1
    mouse_ortholog_of: np.ndarray  # (genes,) int
    mouse_base_log_mean: np.ndarray  # (genes,)
    # one-to-many: extra mouse gene n_genes + k is the second paralog of human gene mouse_paralog_of[k]
    mouse_paralog_of: np.ndarray  # (extra,) int, sorted
    mouse_paralog_base_log_mean: np.ndarray  # (extra,)
    protein_gene: np.ndarray  # (proteins,) human gene index each protein is tied to
    protein_partner_gene: np.ndarray  # (proteins,) second gene of "complex" proteins, -1 otherwise
    protein_kind: np.ndarray  # (proteins,) str: linear, switch, complex
    peaks: "_PeakPlan | None"  # ATAC peaks (n_peaks > 0)
    log_normaliser: float  # log of sum_g exp(base_log_mean)


def _make_plan(settings: SimulationSettings) -> _GenePlan:
    rng = np.random.default_rng([settings.seed, 0])
    n_genes, n_types, n_modules = settings.n_genes, settings.n_cell_types, settings.n_modules
    order = rng.permutation(n_genes)
    n_in_modules = int(settings.module_fraction * n_genes)

    module = np.full(n_genes, -1, dtype=np.int64)
    module[order[:n_in_modules]] = np.arange(n_in_modules) % n_modules
    is_regulator = np.zeros(n_genes, dtype=bool)
    module_regulator = np.empty(n_modules, dtype=np.int64)
    for m in range(n_modules):
        members = np.flatnonzero(module == m)
        module_regulator[m] = members[0]
        is_regulator[members[0]] = True
    edge_weight = rng.uniform(0.5, 1.0, n_genes) * np.where(rng.random(n_genes) < 0.2, -1.0, 1.0)
    edge_weight[(module < 0) | is_regulator] = 0.0

    # each type switches on its own primary module plus one random secondary module
    type_module_activity = np.zeros((n_types, n_modules))
    for t in range(n_types):
        type_module_activity[t, t % n_modules] = settings.module_log_fold_change
        type_module_activity[t, rng.integers(n_modules)] += settings.module_log_fold_change

    marker_of = np.full(n_genes, -1, dtype=np.int64)
    free_genes = order[n_in_modules:]
    n_markers = settings.markers_per_type * n_types
    marker_of[free_genes[:n_markers]] = np.arange(n_markers) // settings.markers_per_type

    base_log_mean = rng.normal(0.0, 1.0, n_genes)
    trajectory_slope = np.zeros(n_genes)
    if settings.trajectory:
        n_traj = max(1, int(settings.trajectory_fraction * n_genes))
        chosen = rng.choice(n_genes, n_traj, replace=False)
        trajectory_slope[chosen] = settings.trajectory_log_fold_change * rng.choice([-1.0, 1.0], n_traj)
    batch_shift = rng.normal(0.0, settings.batch_effect_sd, (settings.n_batches, n_genes))
    type_proportions = rng.dirichlet(np.full(n_types, 5.0))

    mouse_ortholog_of = np.where(rng.random(n_genes) < settings.ortholog_fraction, np.arange(n_genes), -1)
    mouse_base_log_mean = np.where(
        mouse_ortholog_of >= 0,
        base_log_mean + rng.normal(0.0, settings.species_shift_sd, n_genes),
        rng.normal(0.0, 1.0, n_genes),
    )
    # one-to-many orthologs from a stream of their own, so the rest of the plan does not move
    paralog_rng = np.random.default_rng([settings.seed, 2])
    mouse_paralog_of = _one_to_many(settings, paralog_rng, mouse_ortholog_of, marker_of)
    share = paralog_rng.uniform(0.3, 0.7, len(mouse_paralog_of))  # first paralog's share
    unsplit = mouse_base_log_mean[mouse_paralog_of]
    mouse_paralog_base_log_mean = unsplit + np.log1p(-share)
    mouse_base_log_mean[mouse_paralog_of] = unsplit + np.log(share)
    protein_gene, protein_partner_gene, protein_kind = _protein_plan(settings, module, is_regulator)
    branch_slope = _branch_slopes(settings, trajectory_slope)

    return _GenePlan(
        base_log_mean=base_log_mean,
        module=module,
        is_regulator=is_regulator,
        edge_weight=edge_weight,
        module_regulator=module_regulator,
        type_module_activity=type_module_activity,
        marker_of=marker_of,
        trajectory_slope=trajectory_slope,
        branch_slope=branch_slope,
        batch_shift=batch_shift,
        type_proportions=type_proportions,
        mouse_ortholog_of=mouse_ortholog_of,
        mouse_base_log_mean=mouse_base_log_mean,
        mouse_paralog_of=mouse_paralog_of,
        mouse_paralog_base_log_mean=mouse_paralog_base_log_mean,
        protein_gene=protein_gene,
        protein_partner_gene=protein_partner_gene,
        protein_kind=protein_kind,
        peaks=_peak_plan(settings, module, marker_of) if settings.n_peaks else None,
        log_normaliser=float(np.log(np.exp(base_log_mean).sum())),
    )


PROTEIN_KINDS = ("linear", "switch", "complex")


def _protein_plan(settings: SimulationSettings, module: np.ndarray, is_regulator: np.ndarray):
    """Each protein's module gene, partner gene (``complex`` proteins) and kind, from a random
    stream of its own. Protein ``p`` reads a target gene of module ``p mod n_modules`` (its
    partner one of the next module), so the proteins spread over the modules."""
    rng = np.random.default_rng([settings.seed, 4])
    n = settings.n_proteins
    kinds = np.array([PROTEIN_KINDS[p % len(PROTEIN_KINDS)] for p in range(n)], dtype=object)
    genes, partners = np.empty(n, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    for p in range(n):
        for chosen, m in ((genes, p), (partners, p + 1)):
            if chosen is partners and kinds[p] != "complex":
                continue
            members = np.flatnonzero((module == m % settings.n_modules) & ~is_regulator)
            if not len(members):
                members = np.flatnonzero(module == m % settings.n_modules)
            chosen[p] = rng.choice(members)
    return genes, partners, kinds


def _protein_counts(settings: SimulationSettings, plan: "_GenePlan", program: np.ndarray, block: int):
    """(cells, proteins) float32 counts and (cells,) bool hidden state of one block's cells."""
    rng = np.random.default_rng([settings.seed, 5, block])
    x = program[:, plan.protein_gene].astype(np.float64)  # (cells, proteins)
    eta = np.empty_like(x)
    for kind in PROTEIN_KINDS:
        columns = np.flatnonzero(plan.protein_kind == kind)
        if kind == "linear":
            eta[:, columns] = 1.5 * x[:, columns]
        elif kind == "switch":
            eta[:, columns] = 3.0 / (1.0 + np.exp(-6.0 * (x[:, columns] - 0.4)))
        else:
            partner = program[:, plan.protein_partner_gene[columns]]
            eta[:, columns] = 2.0 * np.minimum(x[:, columns], partner)
    state = rng.random(len(x)) < 0.5  # hidden from RNA
    eta[:, : settings.state_proteins] += settings.protein_state_log_fold_change * state[:, None]
    mean = 30.0 * np.exp(eta) + 5.0
    counts = rng.poisson(rng.gamma(20.0, mean / 20.0)).astype(np.float32)
    return counts, state


@dataclass
class _PeakPlan:
    gene_chrom: np.ndarray  # (genes,) str chromosome of each human gene
    gene_start: np.ndarray  # (genes,) int64 base position of each gene's start
    gene: np.ndarray  # (peaks,) int gene each peak sits near
    chrom: np.ndarray  # (peaks,) str
    start: np.ndarray  # (peaks,) int64
    end: np.ndarray  # (peaks,) int64
    slope: np.ndarray  # (peaks,) logit change per unit of the gene's programme (0: background peak)
    intercept: np.ndarray  # (peaks,) logit of the baseline open probability

    @property
    def names(self) -> np.ndarray:
        return np.array([f"{c}:{s}-{e}" for c, s, e in zip(self.chrom, self.start, self.end)])


def _peak_plan(settings: SimulationSettings, module: np.ndarray, marker_of: np.ndarray) -> _PeakPlan:
    """Genomic layout of the genes and, per peak, its gene, coordinates and accessibility model
    (module docstring, "ATAC peaks"), from a random stream of its own."""
    rng = np.random.default_rng([settings.seed, 7])
    n_genes, n_peaks = settings.n_genes, settings.n_peaks
    n_driven = int(round(settings.atac_driven_fraction * n_peaks))
    with_programme = np.flatnonzero((module >= 0) | (marker_of >= 0))
    gene = np.concatenate([rng.choice(with_programme, n_driven), rng.integers(n_genes, size=n_peaks - n_driven)])
    slope = np.concatenate([rng.uniform(1.5, 3.0, n_driven), np.zeros(n_peaks - n_driven)])
    base_rate = rng.uniform(0.05, 0.3, n_peaks)
    # genes in a random order along the chromosomes, far enough apart that their peaks never meet
    slots = rng.permutation(n_genes)
    peaks_per_gene = np.bincount(gene, minlength=n_genes)
    spacing = 100_000 + PEAK_STEP * int(peaks_per_gene.max())
    gene_chrom = np.array([f"chr{1 + slot % N_CHROMOSOMES}" for slot in slots])
    gene_start = (1 + slots // N_CHROMOSOMES).astype(np.int64) * spacing
    # the r-th peak of a gene: alternately downstream and upstream of its start, 3 kb further each pair
    rank = np.empty(n_peaks, dtype=np.int64)
    for g in np.unique(gene):
        members = np.flatnonzero(gene == g)
        rank[members] = np.arange(len(members))
    offset = np.where(rank % 2 == 0, 1, -1) * (1 + rank // 2) * PEAK_STEP - PEAK_WIDTH // 2
    start = gene_start[gene] + offset
    return _PeakPlan(
        gene_chrom=gene_chrom,
        gene_start=gene_start,
        gene=gene,
        chrom=gene_chrom[gene],
        start=start,
        end=start + PEAK_WIDTH,
        slope=slope,
        intercept=np.log(base_rate / (1 - base_rate)),
    )


def _peak_counts(settings: SimulationSettings, plan: "_GenePlan", program: np.ndarray, block: int) -> sp.csr_matrix:
    """(cells, peaks) CSR float32 fragment counts of one block's cells."""
    rng = np.random.default_rng([settings.seed, 8, block])
    peaks = plan.peaks
    n_cells = len(program)
    capture = rng.normal(0.0, 0.3, (n_cells, 1))  # log capture efficiency of each cell
    logit = peaks.intercept + peaks.slope * program[:, peaks.gene] + capture + rng.normal(0.0, 0.5, (n_cells, len(peaks.gene)))
    is_open = rng.random(logit.shape) < 1.0 / (1.0 + np.exp(-logit))
    counts = is_open * (1 + rng.poisson(0.3, logit.shape))
    return sp.csr_matrix(counts.astype(np.float32))


def _branch_slopes(settings: SimulationSettings, trajectory_slope: np.ndarray) -> np.ndarray:
    """(2, genes) slopes of the genes of branch a and b: two disjoint sets of
    ``trajectory_fraction`` of the genes, among those that do not follow t, each gene rising or
    falling by ``trajectory_log_fold_change``. Drawn from a stream of their own."""
    slopes = np.zeros((2, settings.n_genes))
    if settings.trajectory_shape != "branching":
        return slopes
    rng = np.random.default_rng([settings.seed, 3])
    candidates = np.flatnonzero(trajectory_slope == 0)
    n_branch = min(max(1, int(settings.trajectory_fraction * settings.n_genes)), len(candidates) // 2)
    chosen = rng.choice(candidates, 2 * n_branch, replace=False).reshape(2, n_branch)
    for branch, genes in enumerate(chosen):
        slopes[branch, genes] = settings.trajectory_log_fold_change * rng.choice([-1.0, 1.0], n_branch)
    return slopes


def _one_to_many(
    settings: SimulationSettings, rng: np.random.Generator, mouse_ortholog_of: np.ndarray, marker_of: np.ndarray
) -> np.ndarray:
    """Sorted indices of the human genes whose mouse ortholog is two paralogs.

    Stratified: ``round(fraction × count)`` of the orthologous marker genes (at least one when
    the fraction is positive) and of the other orthologous genes.
    """
    if settings.one_to_many_fraction == 0:
        return np.zeros(0, dtype=np.int64)
    has_ortholog = mouse_ortholog_of >= 0
    chosen = []
    for minimum, group in ((1, has_ortholog & (marker_of >= 0)), (0, has_ortholog & (marker_of < 0))):
        genes = np.flatnonzero(group)
        k = min(len(genes), max(minimum, int(round(settings.one_to_many_fraction * len(genes)))))
        chosen.append(rng.choice(genes, k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


@dataclass
class _CellBlock:
    counts: sp.csr_matrix  # (cells, genes × species) float32 raw counts
    obs: pd.DataFrame
    protein: np.ndarray | None  # (cells, proteins) float32 counts
    atac: sp.csr_matrix | None  # (cells, peaks) float32 fragment counts


def _sample_block(settings: SimulationSettings, plan: _GenePlan, block: int, n_cells: int) -> _CellBlock:
    """Draws ``n_cells`` cells of block number ``block`` (its own random stream)."""
    rng = np.random.default_rng([settings.seed, 1, block])
    n_genes = settings.n_genes
    cell_type = rng.choice(settings.n_cell_types, n_cells, p=plan.type_proportions)
    batch = rng.integers(settings.n_batches, size=n_cells)
    pseudotime = rng.random(n_cells) if settings.trajectory else None
    species = (rng.random(n_cells) < 0.5).astype(np.int64) if settings.second_species else np.zeros(n_cells, np.int64)
    library_size = settings.mean_library_size * np.exp(rng.normal(0.0, settings.library_size_sd, n_cells))

    # (cells, modules): the type's programme plus cell-level noise shared by the module
    module_activity = plan.type_module_activity[cell_type] + rng.normal(
        0.0, settings.module_noise, (n_cells, settings.n_modules)
    )
    regulator_level = module_activity + rng.normal(0.0, settings.regulator_noise, module_activity.shape)
    program = np.zeros((n_cells, n_genes), dtype=np.float32)  # (cells, genes) log effect of the cell's state
    program[:, plan.module_regulator] = regulator_level
    in_module = np.flatnonzero(plan.edge_weight != 0.0)
    program[:, in_module] = regulator_level[:, plan.module[in_module]] * plan.edge_weight[in_module]
    markers = np.flatnonzero(plan.marker_of >= 0)
    program[:, markers] += settings.marker_log_fold_change * (plan.marker_of[markers][None, :] == cell_type[:, None])
    if pseudotime is not None:
        moving = np.flatnonzero(plan.trajectory_slope)
        program[:, moving] += (pseudotime[:, None] - 0.5) * plan.trajectory_slope[moving][None, :]
    branch = None
    if settings.trajectory_shape == "branching":
        # own stream: the draws above and below stay those of the linear trajectory
        branch_rng = np.random.default_rng([settings.seed, 3, block])
        past_fork = pseudotime >= settings.branch_point
        branch = np.where(past_fork, 1 + (branch_rng.random(n_cells) < 0.5), 0)  # 0 stem, 1 a, 2 b
        progress = np.clip((pseudotime - settings.branch_point) / (1.0 - settings.branch_point), 0.0, 1.0)
        for b in (1, 2):
            genes = np.flatnonzero(plan.branch_slope[b - 1])
            on_branch = (branch == b)[:, None]
            program[:, genes] += np.where(on_branch, progress[:, None] * plan.branch_slope[b - 1, genes][None, :], 0.0)
    if settings.n_batches > 1:
        program += plan.batch_shift[batch]

    base = np.where(species[:, None] == 1, plan.mouse_base_log_mean[None, :], plan.base_log_mean[None, :])
    if settings.second_species:
        # mouse genes without a human ortholog get no programme of their own
        program = np.where((species[:, None] == 1) & (plan.mouse_ortholog_of[None, :] < 0), 0.0, program)
        if len(plan.mouse_paralog_of):
            # second paralogs: extra columns with the human gene's programme, mean 0 in human cells
            extra_base = np.where(species[:, None] == 1, plan.mouse_paralog_base_log_mean[None, :], -np.inf)
            base = np.concatenate([base, extra_base], axis=1)
            program = np.concatenate([program, program[:, plan.mouse_paralog_of]], axis=1)
    # float32 throughout the (cells, genes) arrays: sampling is the simulator's cost
    mean = (library_size[:, None] * np.exp(base + program - plan.log_normaliser)).astype(np.float32)  # (cells, genes)

    rate = rng.standard_gamma(settings.nb_theta, mean.shape, dtype=np.float32) * (mean / settings.nb_theta)
    counts = rng.poisson(rate).astype(np.float32)
    counts[rng.random(counts.shape, dtype=np.float32) < settings.dropout / (1.0 + mean)] = 0.0

    if settings.second_species:
        # human cells fill the first n_genes columns, mouse cells the next n_genes (+ paralogs)
        wide = np.zeros((n_cells, n_genes + counts.shape[1]), dtype=np.float32)
        wide[species == 0, :n_genes] = counts[species == 0, :n_genes]
        wide[species == 1, n_genes:] = counts[species == 1]
        counts = wide

    protein = protein_state = None
    if settings.n_proteins:
        protein, protein_state = _protein_counts(settings, plan, program[:, :n_genes], block)

    atac = _peak_counts(settings, plan, program[:, :n_genes], block) if settings.n_peaks else None

    obs = {
        "cell_type": pd.Categorical.from_codes(cell_type, [f"type_{t}" for t in range(settings.n_cell_types)]),
        "batch": pd.Categorical.from_codes(batch, [f"batch_{b}" for b in range(settings.n_batches)]),
        "true_library_size": library_size.astype(np.float32),
    }
    if pseudotime is not None:
        obs["pseudotime"] = pseudotime.astype(np.float32)
    if branch is not None:
        obs["branch"] = pd.Categorical.from_codes(branch, list(BRANCHES))
    if settings.second_species:
        obs["species"] = pd.Categorical.from_codes(species, list(SPECIES))
    if protein_state is not None:
        obs["protein_state"] = pd.Categorical.from_codes(protein_state.astype(np.int64), ["low", "high"])
        subtypes = [f"type_{t}_{s}" for t in range(settings.n_cell_types) for s in ("low", "high")]
        obs["cell_subtype"] = pd.Categorical.from_codes(2 * cell_type + protein_state, subtypes)
    start = block * _BLOCK_CELLS
    index = pd.Index([f"cell_{i:07d}" for i in range(start, start + n_cells)])
    return _CellBlock(sp.csr_matrix(counts), pd.DataFrame(obs, index=index), protein, atac)


def _var_and_truth(settings: SimulationSettings, plan: _GenePlan) -> tuple[pd.DataFrame, dict]:
    n_genes = settings.n_genes
    symbols = np.array([f"SIMG{g:05d}" for g in range(n_genes)])
    ids = np.array([f"ENSSIMG{g:011d}" for g in range(n_genes)])
    cell_types = [f"type_{t}" for t in range(settings.n_cell_types)]
    marker_names = np.where(plan.marker_of >= 0, np.array(cell_types + [""])[plan.marker_of], "")
    var = pd.DataFrame(
        {
            "gene_ids": ids,
            "species": "human",
            "module": plan.module,
            "is_regulator": plan.is_regulator,
            "marker_of": marker_names,
            "base_log_mean": plan.base_log_mean,
            "trajectory_slope": plan.trajectory_slope,
        },
        index=pd.Index(symbols),
    )
    edges_target = np.flatnonzero(plan.edge_weight != 0.0)
    edges_source = plan.module_regulator[plan.module[edges_target]]
    truth: dict = {
        "settings": {k: v for k, v in settings.__dict__.items()},
        "cell_types": np.array(cell_types),
        "type_proportions": plan.type_proportions,
        "type_module_activity": plan.type_module_activity,
        "regulatory_edges": {
            "source": symbols[edges_source],
            "target": symbols[edges_target],
            "weight": plan.edge_weight[edges_target],
        },
    }
    if settings.n_batches > 1:
        truth["batch_shift"] = plan.batch_shift
    if settings.second_species:
        # mouse gene j < n_genes is the ortholog of human gene j (or mouse-specific); gene
        # n_genes + k is the second paralog of human gene mouse_paralog_of[k]
        n_mouse = n_genes + len(plan.mouse_paralog_of)
        human_of = np.concatenate([plan.mouse_ortholog_of, plan.mouse_paralog_of])  # (n_mouse,)
        has = human_of >= 0
        of = np.where(has, human_of, 0)
        mouse_symbols = np.array([f"Simm{g:05d}" for g in range(n_mouse)])
        mouse = pd.DataFrame(
            {
                "gene_ids": [f"ENSSIMMUSG{g:08d}" for g in range(n_mouse)],
                "species": "mouse",
                "module": np.where(has, plan.module[of], -1),
                "is_regulator": plan.is_regulator[of] & has,
                "marker_of": np.where(has, marker_names[of], ""),
                "base_log_mean": np.concatenate([plan.mouse_base_log_mean, plan.mouse_paralog_base_log_mean]),
                "trajectory_slope": np.where(has, plan.trajectory_slope[of], 0.0),
            },
            index=pd.Index(mouse_symbols),
        )
        var = pd.concat([var, mouse])
        # one row per (human, mouse) pair, in human gene order; a one-to-many gene has two rows
        pairs = np.flatnonzero(has)
        pairs = pairs[np.argsort(human_of[pairs], kind="stable")]
        one_to_many = np.isin(human_of[pairs], plan.mouse_paralog_of)
        truth["orthologs"] = {
            "human": symbols[human_of[pairs]],
            "mouse": mouse_symbols[pairs],
            "homology": np.where(one_to_many, "one2many", "one2one"),
        }
    if settings.n_proteins:
        truth["protein_names"] = protein_names(plan, symbols)
        truth["protein_genes"] = symbols[plan.protein_gene]
        truth["protein_partner_genes"] = np.where(plan.protein_partner_gene >= 0, symbols[plan.protein_partner_gene], "")
        truth["protein_kinds"] = plan.protein_kind.astype(str)
        truth["protein_state_proteins"] = protein_names(plan, symbols)[: settings.state_proteins]
    if settings.n_peaks:
        peaks = plan.peaks
        truth["peaks"] = {
            "names": peaks.names,
            "chrom": peaks.chrom,
            "start": peaks.start,
            "end": peaks.end,
            "gene": symbols[peaks.gene],
            "driven": peaks.slope > 0,
            "slope": peaks.slope,
        }
        var.loc[symbols, "chrom"] = peaks.gene_chrom
        var.loc[symbols, "gene_start"] = peaks.gene_start
    if settings.trajectory_shape == "branching":
        # mouse genes (a second species) carry their human ortholog's branch slopes
        human_of = np.arange(n_genes) if not settings.second_species else np.concatenate(
            [np.arange(n_genes), np.where(plan.mouse_ortholog_of >= 0, plan.mouse_ortholog_of, -1), plan.mouse_paralog_of]
        )
        for b, name in enumerate(BRANCHES[1:]):
            var[f"{name}_slope"] = np.where(human_of >= 0, plan.branch_slope[b][np.maximum(human_of, 0)], 0.0)
        truth["branch_point"] = settings.branch_point
    var["module"] = var["module"].astype(np.int64)
    return var, truth


def protein_names(plan: "_GenePlan", symbols: np.ndarray) -> np.ndarray:
    """``PROT<p>_<gene>``: numbered, since two proteins may read the same gene."""
    return np.array([f"PROT{p:03d}_{symbols[g]}" for p, g in enumerate(plan.protein_gene)])


def _block_sizes(n_cells: int) -> list[int]:
    if n_cells < 1:
        raise ValueError(f"n_cells must be at least 1, got {n_cells}.")
    full, rest = divmod(n_cells, _BLOCK_CELLS)
    return [_BLOCK_CELLS] * full + ([rest] if rest else [])


def simulate(n_cells: int = 2000, n_genes: int = 500, *, seed: int = 0, **settings) -> ad.AnnData:
    """Simulates an AnnData of raw integer counts with known ground truth, in memory.

    Args:
        n_cells: number of cells.
        n_genes: genes per species.
        seed: seed of every random draw; the same seed gives the same data.
        **settings: any other field of :class:`SimulationSettings` (``n_cell_types``,
            ``trajectory=True``, ``second_species=True``, ``n_proteins=20``, ...).

    Returns:
        AnnData with
        ``X``: (n_cells, n_genes) CSR float32 raw counts (with a second species, the human genes
        first, then the ``n_genes`` mouse genes and the second paralogs of one-to-many genes,
        ``2 * n_genes + n_one_to_many`` columns; a cell has counts only in its own species'
        columns);
        ``obs``: ``cell_type``, ``batch``, ``true_library_size`` and, when enabled,
        ``pseudotime`` (the true pseudotime in [0, 1), for branching trajectories too),
        ``branch`` (``trajectory_shape="branching"``: ``stem``, ``branch_a``, ``branch_b``) and
        ``species``;
        ``var``: symbols as ``var_names``, ``gene_ids`` (Ensembl-like), ``species``, ``module``
        (-1 = none), ``is_regulator``, ``marker_of`` (cell type or ""), ``base_log_mean``,
        ``trajectory_slope`` and, for a branching trajectory, ``branch_a_slope`` /
        ``branch_b_slope`` (log change of each branch's genes from the fork to t=1);
        ``obsm["protein"]``: (n_cells, n_proteins) float32 protein counts when ``n_proteins > 0``,
        their names in ``uns["protein_names"]`` (scvi-tools' layout), and ``obs``
        ``protein_state`` / ``cell_subtype`` (module docstring, "Proteins");
        ``uns["simulation"]``: the settings, cell types and their proportions, the
        (cell_types, modules) programme, ``regulatory_edges`` (source → target symbols with
        weights) and, when enabled, ``batch_shift`` (batches, genes) natural-log gene shifts,
        ``orthologs`` (one entry per human–mouse pair: ``human`` and ``mouse`` symbols and
        ``homology``, ``"one2one"`` or ``"one2many"``; a one-to-many human gene appears twice)
        and ``protein_names`` / ``protein_genes``.
    """
    config = SimulationSettings(n_genes=n_genes, seed=seed, **settings)
    plan = _make_plan(config)
    blocks = [_sample_block(config, plan, b, size) for b, size in enumerate(_block_sizes(n_cells))]
    var, truth = _var_and_truth(config, plan)
    adata = ad.AnnData(
        X=sp.vstack([b.counts for b in blocks], format="csr"),
        obs=pd.concat([b.obs for b in blocks]),
        var=var,
        uns={"simulation": truth},
    )
    if config.n_proteins:
        adata.obsm["protein"] = np.concatenate([b.protein for b in blocks])
        adata.uns["protein_names"] = truth["protein_names"]
    if config.n_peaks:
        adata.obsm["atac"] = sp.vstack([b.atac for b in blocks], format="csr")
        adata.uns["peak_names"] = truth["peaks"]["names"]
    return adata


def simulate_multiome(n_cells: int = 2000, n_genes: int = 500, n_peaks: int = 2000, *, seed: int = 0, **settings):
    """Simulated multiome cells (RNA + ATAC) as a MuData with modalities ``rna`` and ``atac``.

    ``rna`` is :func:`simulate`'s AnnData without ``obsm["atac"]``; ``atac`` holds the
    (n_cells, n_peaks) CSR fragment counts of the same cells (same ``obs_names`` and ``obs``),
    peaks named ``chr1:1000-1500`` with ``var`` columns ``chrom``, ``start``, ``end``, and the
    ground truth ``gene`` (the gene each peak sits near), ``driven`` and ``slope`` (module
    docstring, "ATAC peaks"). Simulated data: it shows mechanics, not biology.
    """
    import mudata

    if n_peaks < 1:
        raise ValueError(f"simulate_multiome needs n_peaks >= 1, got {n_peaks}.")
    rna = simulate(n_cells, n_genes, seed=seed, n_peaks=n_peaks, **settings)
    counts = rna.obsm.pop("atac")
    del rna.uns["peak_names"]
    truth = rna.uns["simulation"]["peaks"]
    var = pd.DataFrame(
        {key: np.asarray(truth[key]) for key in ("chrom", "start", "end", "gene", "driven", "slope")},
        index=pd.Index(np.asarray(truth["names"])),
    )
    atac = ad.AnnData(X=counts, obs=rna.obs.copy(), var=var)
    with mudata.set_options(pull_on_update=False):  # the modalities keep their own obs / var columns
        return mudata.MuData({"rna": rna, "atac": atac})


def write_simulated_h5ad(path: str | Path, n_cells: int, n_genes: int = 2000, *, seed: int = 0, **settings) -> Path:
    """Simulates cells block by block straight into a ``.h5ad`` file, with bounded memory.

    Gives exactly the cells of ``simulate(n_cells, n_genes, seed=seed, **settings)`` but holds
    only one block of 4,096 cells at a time (plus the per-cell ``obs`` table), so it scales to
    millions of cells. ``X`` is written as a CSR matrix that anndata reads in backed mode.

    Args:
        path: output ``.h5ad`` file (overwritten).
        n_cells: number of cells.
        n_genes: genes per species.
        seed, **settings: as for :func:`simulate`.

    Returns:
        The path written.
    """
    config = SimulationSettings(n_genes=n_genes, seed=seed, **settings)
    if config.n_peaks:
        raise ValueError("write_simulated_h5ad writes RNA (and proteins) only; simulate ATAC peaks with simulate_multiome.")
    plan = _make_plan(config)
    var, truth = _var_and_truth(config, plan)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obs_parts, protein_parts = [], []
    nnz = 0
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        group = f.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, len(var))})
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = group.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        row = 0
        for b, size in enumerate(_block_sizes(n_cells)):
            block = _sample_block(config, plan, b, size)
            block_nnz = block.counts.nnz
            data.resize((nnz + block_nnz,))
            indices.resize((nnz + block_nnz,))
            data[nnz:] = block.counts.data
            indices[nnz:] = block.counts.indices
            indptr[row + 1 : row + size + 1] = block.counts.indptr[1:] + nnz
            nnz += block_nnz
            row += size
            obs_parts.append(block.obs)
            if block.protein is not None:
                protein_parts.append(block.protein)
        obs = pd.concat(obs_parts)
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        write_elem(f, "uns", {"simulation": truth, **({"protein_names": truth["protein_names"]} if protein_parts else {})})
        write_elem(f, "obsm", {"protein": np.concatenate(protein_parts)} if protein_parts else {})
        for empty in ("varm", "obsp", "varp", "layers"):
            write_elem(f, empty, {})
    return path


def simulate_two_species(
    n_cells_per_species: int = 1000, n_genes: int = 500, *, seed: int = 0, **settings
) -> tuple[ad.AnnData, ad.AnnData, pd.DataFrame]:
    """Simulates human and mouse cells as two AnnData objects plus their ortholog table.

    Runs :func:`simulate` with ``second_species=True``, ``one_to_many_fraction=0.1`` and the
    default ``species_shift_sd=0.3`` (each overridable through ``settings``) on enough cells
    that both species have ``n_cells_per_species`` (a fixed number for a given
    ``n_cells_per_species``, so the result is deterministic for a seed), then keeps the first
    ``n_cells_per_species`` cells of each species and only that species' genes.

    Args:
        n_cells_per_species: cells of each species.
        n_genes: human genes; mouse has as many plus one per one-to-many gene.
        seed: seed of every random draw.
        **settings: any other field of :class:`SimulationSettings`.

    Returns:
        ``(human, mouse, orthologs)``: two AnnData objects of raw integer counts (CSR float32
        ``X``), each with ``obs["cell_type"]`` (the same categories in both), ``obs["species"]``,
        ``obs["batch"]``, ``obs["true_library_size"]``, the species' symbols as ``var_names``,
        ``var["gene_ids"]`` and the ground-truth columns of :func:`simulate`, and the
        simulation's truth in ``uns["simulation"]``; and the ortholog table, a DataFrame with
        columns ``human`` and ``mouse`` (symbols, one row per pair, a one-to-many gene on two
        rows), ready for ``to_csv(path, sep="\t", index=False)``.
    """
    if n_cells_per_species < 1:
        raise ValueError(f"n_cells_per_species must be at least 1, got {n_cells_per_species}.")
    settings = {"second_species": True, "one_to_many_fraction": 0.1, **settings}
    if not settings["second_species"]:
        raise ValueError("simulate_two_species needs second_species=True.")
    # cells are human or mouse with probability 1/2: 6 standard deviations of headroom
    n_cells = 2 * n_cells_per_species + int(np.ceil(6 * np.sqrt(2 * n_cells_per_species))) + 16
    while True:
        both = simulate(n_cells, n_genes, seed=seed, **settings)
        species = both.obs["species"].to_numpy()
        if min((species == name).sum() for name in SPECIES) >= n_cells_per_species:
            break
        n_cells *= 2
    cell_types = list(both.uns["simulation"]["cell_types"])
    parts = []
    for name in SPECIES:
        cells = np.flatnonzero(species == name)[:n_cells_per_species]
        genes = np.flatnonzero((both.var["species"] == name).to_numpy())
        part = both[cells, genes].copy()
        part.obs["cell_type"] = part.obs["cell_type"].cat.set_categories(cell_types)
        part.obs["species"] = pd.Categorical([name] * len(part), categories=list(SPECIES))
        parts.append(part)
    pairs = both.uns["simulation"]["orthologs"]
    orthologs = pd.DataFrame({"human": np.asarray(pairs["human"]), "mouse": np.asarray(pairs["mouse"])})
    return parts[0], parts[1], orthologs
