"""The table layout is defined once (speed_kernels/tables.py ROWS); the C++/CUDA header is generated
from it and must not drift; the Triton kernels and the rows the builder fills agree with it."""
from pathlib import Path

import torch

from speed_kernels import NoiseSchedule, strategies, tables

ROOT = Path(__file__).resolve().parents[1]


def test_generated_header_is_current():
    header = (ROOT / "csrc" / "table_rows.h").read_text()
    assert header == tables.c_header(), (
        "csrc/table_rows.h is stale: run `python -m speed_kernels.tables > csrc/table_rows.h`"
    )


def test_row_constants_follow_rows():
    for i, (const, name, _) in enumerate(tables.ROWS):
        assert getattr(tables, const) == i
        assert tables.ROW_NAMES[i] == name
    assert tables.NUM_ROWS == len(tables.ROWS) == len(set(tables.ROW_NAMES))


def test_no_other_row_numbering_in_the_sources():
    """Kernels name rows through the generated header or tables.py, never by a literal index."""
    for path in list((ROOT / "csrc").glob("*.cu")) + list((ROOT / "csrc").glob("*.cpp")) + list((ROOT / "csrc").glob("*.h")):
        if path.name == "table_rows.h":
            continue
        text = path.read_text()
        for const, _, _ in tables.ROWS:
            assert f"{const} =" not in text, f"{path.name} defines {const} itself"


def test_built_rows_hold_what_their_names_say():
    sched = NoiseSchedule.linear()
    strat = strategies.get("p2")
    probs = strat.probs(sched, step=0)
    weights = strat.weights(sched, prediction="eps")
    tab = tables.build_tables(sched, probs, weights, "eps", learn_sigma=True).double()
    ab = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64)
    betas = torch.as_tensor(sched.betas, dtype=torch.float64)
    torch.testing.assert_close(tab[tables.ROW_SQRT_AB], ab.sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(tab[tables.ROW_SQRT_1MAB], (1 - ab).sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(tab[tables.ROW_WEIGHT], torch.as_tensor(weights, dtype=torch.float64), rtol=1e-6, atol=0)
    assert tab[tables.ROW_CDF][-1] == 1.0
    torch.testing.assert_close(tab[tables.ROW_LOG_BETA], betas.log(), rtol=1e-6, atol=0)
    torch.testing.assert_close(tab[tables.ROW_X0HAT_XT], (1 / ab).sqrt(), rtol=1e-6, atol=0)
