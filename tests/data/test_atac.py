"""The ATAC modality's data side: peak coordinates, binarisation, the genomic peak graph, reading a
``.h5mu`` ATAC modality by cell id, and the simulator's peaks."""

import numpy as np
import pandas as pd
import pytest

from scrnalf_hf.data.atac import (
    PeakCoordinates,
    binarize_peaks,
    build_peak_graph,
    parse_peak_coordinates,
    read_atac,
)
from scrnalf_hf.data.simulation import simulate_multiome


def brute_force_peak_graph(coordinates: PeakCoordinates, k: int) -> list[set[int]]:
    """Each peak's k nearest peaks on its chromosome, by centre distance, from all pairs."""
    centre = (coordinates.start + coordinates.end) / 2
    rows = []
    for p in range(len(centre)):
        same = np.flatnonzero(coordinates.chrom == coordinates.chrom[p])
        distance = np.abs(centre[same] - centre[p])
        rows.append(set(same[np.argsort(distance, kind="stable")[:k]].tolist()))
    return rows


def test_peak_graph_lists_the_nearest_peaks_of_the_same_chromosome_and_pads_short_chromosomes():
    # chr2 has 2 peaks (< k = 3): its rows are padded; chr1's peaks are shuffled in panel order,
    # and chrX's first peak lies next to chr1's last one in position but on another chromosome
    coordinates = PeakCoordinates(
        chrom=np.array(["chr1", "chr2", "chr1", "chrX", "chr1", "chr2", "chr1", "chrX", "chrX"]),
        start=np.array([5000, 100, 0, 6100, 1000, 900, 9000, 7000, 50_000]),
        end=np.array([5500, 600, 500, 6600, 1500, 1400, 9500, 7500, 50_500]),
    )
    table = build_peak_graph(coordinates, k=3)
    assert table.shape == (9, 3) and table.dtype == np.int64
    assert (table[:, 0] == np.arange(9)).all()  # nearest first: the peak itself
    assert table[1].tolist() == [1, 5, -1] and table[5].tolist() == [5, 1, -1]
    assert table[0].tolist() == [0, 4, 6]  # chr1:5000-5500: 4,000 to peak 4, 4,000 to peak 6 (ties: earlier first)
    for row, expected in zip(table, brute_force_peak_graph(coordinates, 3)):
        assert set(row[row >= 0].tolist()) == expected
    chromosome = coordinates.chrom
    for p, row in enumerate(table):
        assert (chromosome[row[row >= 0]] == chromosome[p]).all()


def test_peak_graph_matches_brute_force_on_random_peaks():
    rng = np.random.default_rng(0)
    start = rng.choice(10_000_000, 400, replace=False)
    coordinates = PeakCoordinates(rng.choice(["chr1", "chr2", "chr3"], 400), start, start + rng.integers(200, 800, 400))
    table = build_peak_graph(coordinates, k=6)
    for row, expected in zip(table, brute_force_peak_graph(coordinates, 6)):
        assert set(row.tolist()) == expected


def test_peak_coordinates_come_from_names_or_var_columns():
    parsed = parse_peak_coordinates(["chr1:100-600", "chr2-5000-5400", "chrX_7_90"])
    assert parsed.chrom.tolist() == ["chr1", "chr2", "chrX"]
    assert parsed.start.tolist() == [100, 5000, 7] and parsed.end.tolist() == [600, 5400, 90]
    var = pd.DataFrame({"chrom": ["chr3", "chr3"], "start": [10, 20], "end": [15, 25]}, index=["peakA", "peakB"])
    from_var = parse_peak_coordinates(var.index, var)
    assert from_var.chrom.tolist() == ["chr3", "chr3"] and from_var.start.tolist() == [10, 20]
    with pytest.raises(ValueError, match="without parseable coordinates .*peakA"):
        parse_peak_coordinates(["peakA", "chr1:1-5"])
    with pytest.raises(ValueError, match="zero peaks"):
        parse_peak_coordinates([])
    with pytest.raises(ValueError, match="end <= start"):
        parse_peak_coordinates(["chr1:500-100"])


def test_binarised_accessibility_is_open_where_any_fragment_falls():
    assert binarize_peaks(np.array([[0, 1, 3], [2, 0, 0]])).tolist() == [[0, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="negative"):
        binarize_peaks(np.array([[0, -1]]))


def test_read_atac_matches_cells_by_id_not_position(tmp_path):
    mdata = simulate_multiome(40, 100, 50, seed=1)
    rna = mdata.mod["rna"]
    reordered = mdata.mod["atac"][::-1].copy()  # same cells, reversed rows
    expected = (mdata.mod["atac"].X.toarray() > 0).astype(np.float32)
    import mudata

    mudata.MuData({"rna": rna, "atac": reordered}).write_h5mu(tmp_path / "cells.h5mu")
    read_rna, peaks = read_atac(tmp_path / "cells.h5mu")
    assert list(read_rna.obs_names) == list(rna.obs_names)
    np.testing.assert_array_equal(peaks.accessibility, expected)
    assert peaks.coordinates.chrom[0] == mdata.mod["atac"].var["chrom"].iloc[0]


def test_simulated_driven_peaks_follow_their_gene_and_background_peaks_do_not():
    mdata = simulate_multiome(600, 100, 200, seed=0)
    rna, atac = mdata.mod["rna"], mdata.mod["atac"]
    expression = np.log1p(rna.X.toarray() / rna.X.toarray().sum(1, keepdims=True) * 1e4)
    gene_column = rna.var_names.get_indexer(atac.var["gene"])
    open_peaks = atac.X.toarray() > 0

    def correlation(p: int) -> float:
        return float(np.corrcoef(open_peaks[:, p], expression[:, gene_column[p]])[0, 1])

    driven = atac.var["driven"].to_numpy()
    driven_r = np.nanmedian([correlation(p) for p in np.flatnonzero(driven)])
    background_r = np.nanmedian([abs(correlation(p)) for p in np.flatnonzero(~driven)])
    assert driven_r > 0.1 > 2 * background_r
    # every peak sits within 100 kb of its gene's start, on its chromosome
    genes = rna.var.loc[atac.var["gene"]]
    assert (genes["chrom"].to_numpy() == atac.var["chrom"].to_numpy()).all()
    assert (np.abs(atac.var["start"].to_numpy() - genes["gene_start"].to_numpy()) < 100_000).all()
