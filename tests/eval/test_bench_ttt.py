from ttt_video.eval.bench_ttt import HEADER, _Rows, attention_flops, format_table, ttt_flops


def test_flop_counts_match_the_documented_formulas():
    assert ttt_flops("mlp", 64, 1, 64, 64) == 14 * 64 * 64 * 256 + 4 * 64 * 64 * 256 + 4 * 64 * 64 * 64  # 19.9 M
    assert ttt_flops("linear", 64, 1, 64, 64) == 6 * 64 * 64 * 64 + 4 * 64 * 64 * 64
    assert attention_flops(1, 1, 64) == 4 * 18008**2 * 64


def test_rows_are_reported_as_they_are_measured():
    seen = []
    rows = _Rows(seen.append)
    row = dict(seconds=3, T=16722, op="ttt-mlp", impl="triton", mode="fwd", ms=16.5, tflops=30.2, ratio=1.79)
    rows.append(row)
    rows.append(dict(row, impl="torch", ms=None, tflops=None, ratio=None, skipped=12.5))
    assert seen == list(rows)
    lines = format_table(rows).splitlines()
    assert lines[0] == HEADER and "16.50" in lines[1] and "1.790" in lines[1] and "skipped (est. 12.5 s)" in lines[2]
