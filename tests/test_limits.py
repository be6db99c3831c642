"""Token-bucket rate limits: pure logic, with a fake clock."""

from daemon.api.limits import RateLimiter, TokenBucket


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_bucket_refills_at_its_rate_and_caps_at_capacity():
    clock = Clock()
    b = TokenBucket(60, clock)            # one a second
    b.take(60)
    assert b.wait_time(1) == 1.0
    clock.t = 0.5
    assert b.wait_time(1) == 0.5
    clock.t = 1000
    assert b.wait_time(60) == 0.0 and b.wait_time(61) > 0


def test_requests_per_minute_admits_then_says_when():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=2, tokens_per_minute=None, clock=clock)
    assert rl.admit("k") == 0 and rl.admit("k") == 0
    assert rl.admit("k") == 30.0
    assert rl.admit("other") == 0          # per key
    clock.t = 30
    assert rl.admit("k") == 0


def test_tokens_are_charged_after_the_fact_and_block_until_repaid():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=None, tokens_per_minute=600, clock=clock)   # 10 a second
    assert rl.admit("k") == 0
    rl.charge("k", 700)                    # one big request overdraws the bucket
    wait = rl.admit("k")
    assert 10.0 <= wait <= 10.01
    clock.t = wait
    assert rl.admit("k") == 0


def test_buckets_per_client_are_bounded_and_full_ones_go_first():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=2, tokens_per_minute=None, clock=clock, max_keys=10)
    for i in range(9):
        rl.admit(f"idle-{i}")                # half used at t=0: full again by t=60
    clock.t = 60
    assert rl.admit("hot") == 0 and rl.admit("hot") == 0
    for i in range(1000):                    # a scan from many addresses
        rl.admit(f"scan-{i}")
        assert len(rl.buckets) <= 10
    assert not any(k.startswith("idle-") for k in rl.buckets)


def test_a_full_bucket_is_dropped_before_a_drained_one():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=2, tokens_per_minute=None, clock=clock, max_keys=3)
    rl.admit("refilled")
    clock.t = 60                             # "refilled" is full again: same as no bucket
    rl.admit("hot"), rl.admit("hot")         # drained
    rl.admit("new-1")
    rl.admit("new-2")                        # over the cap: "refilled" goes, "hot" stays limited
    assert "refilled" not in rl.buckets
    assert rl.admit("hot") == 30.0


def test_new_limits_apply_to_every_key():
    clock = Clock()
    rl = RateLimiter(requests_per_minute=1, tokens_per_minute=None, clock=clock)
    assert rl.admit("k") == 0 and rl.admit("k") > 0
    rl.configure(requests_per_minute=100, tokens_per_minute=None)
    assert rl.admit("k") == 0
    rl.configure(requests_per_minute=None, tokens_per_minute=None)
    assert all(rl.admit("k") == 0 for _ in range(1000)) and not rl.buckets
