import pytest

from ttt_video.data.buckets import Bucket, BucketBatchSampler, nearest_resolution, parse_resolutions
from ttt_video.errors import UserError

WIDE, TALL = (576, 1024), (1024, 576)


def test_parse_and_nearest_resolution():
    res = parse_resolutions("576x1024, 1024x576,432x768,768x432", (32, 32))
    assert res == [WIDE, TALL, (432, 768), (768, 432)]
    assert parse_resolutions("", (32, 48)) == [(32, 48)]
    with pytest.raises(UserError, match="'576by1024' is not HEIGHTxWIDTH"):
        parse_resolutions("576by1024", (32, 32))
    assert nearest_resolution(1080, 1920, res) == WIDE  # first of two equal aspect ratios
    assert nearest_resolution(1920, 1080, res) == TALL
    assert nearest_resolution(480, 640, [WIDE, TALL, (512, 512)]) == (512, 512)


def sampler(buckets, start=0, stop=12, **kw):
    return BucketBatchSampler(buckets, 3, start, stop, seed=kw.pop("seed", 5), **kw)


BUCKETS = [Bucket(16, 24, 2)] * 7 + [Bucket(24, 16, 2)] * 4 + [Bucket(16, 24, 1)] * 2


def test_batches_hold_one_bucket_and_cover_every_item_each_epoch():
    s = sampler(BUCKETS)
    assert s.batches_per_epoch == 3 + 2 + 1
    batches = list(s)
    assert len(batches) == 12
    for epoch in range(2):
        seen = set()
        for batch in batches[epoch * 6:(epoch + 1) * 6]:
            items = [d % len(BUCKETS) for d in batch]
            assert all(d // len(BUCKETS) == epoch for d in batch)  # draw index carries the epoch
            assert len({BUCKETS[i] for i in items}) == 1
            seen.update(items)
        assert seen == set(range(len(BUCKETS)))
    assert batches[:6] != [[d - len(BUCKETS) for d in b] for b in batches[6:]]  # reshuffled per epoch


def test_batch_i_depends_only_on_seed_and_step():
    full = list(sampler(BUCKETS))
    assert list(sampler(BUCKETS, start=7)) == full[7:]
    assert list(sampler(BUCKETS, seed=6)) != full
    ranks = [list(sampler(BUCKETS, 0, 6, rank=r, world=2)) for r in range(2)]
    assert [b for pair in zip(*ranks) for b in pair] == full  # processes take interleaved global batches


def test_no_items_is_a_user_error():
    with pytest.raises(UserError, match="no usable items"):
        sampler([])
