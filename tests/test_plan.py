"""build_plan end to end: what the batcher reads from a Plan."""

from hypothesis import given, settings
from hypothesis import strategies as st

from batchjax import workloads
from batchjax.schedule.grouping import GROUPING_METHODS
from batchjax.schedule.plan import build_plan, build_plan_from_tokens
from batchjax.schedule.step_plan import SchedRequest

requests_strategy = st.lists(
    st.builds(
        SchedRequest,
        st.lists(st.integers(0, 3), min_size=1, max_size=12).map(tuple),
        st.integers(1, 64),
        st.one_of(st.none(), st.floats(1, 64)),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=80, deadline=None)
@given(requests_strategy, st.sampled_from(GROUPING_METHODS))
def test_plan_schedules_every_request_once_and_reconstructs_prompts(requests, method):
    plan = build_plan(requests, grouping_method=method)
    assert sorted(plan.execution_order().tolist()) == list(range(len(requests)))
    for g, ids in zip(plan.groups, plan.request_order):
        assert sorted(ids) == list(g.request_ids)
    for r, request in enumerate(requests):
        g = plan.groups[plan.group_of_request[r]]
        assert g.group_id == plan.group_of_request[r]
        assert plan.prefix_len_of_request[r] == g.prefix_len
        suffix = tuple(plan.suffix_token_ids(r).tolist())
        assert len(suffix) >= 1 and g.prefix_token_ids + suffix == request.prompt_token_ids
    computed = sum(g.prefix_len for g in plan.groups) + sum(
        len(plan.suffix_token_ids(r)) for r in range(len(requests))
    )
    assert plan.planned_prefill_tokens == computed
    assert plan.saving_ratio <= plan.optimal_saving_ratio + 1e-12
    again = build_plan(requests, grouping_method=method)
    assert again.groups == plan.groups and again.request_order == plan.request_order


def test_plan_of_the_microbenchmark_shares_every_prefix_once():
    w = workloads.microbenchmark(64, 8, 10, 4, 400, vocab_size=1 << 20, seed=2)
    plan = build_plan_from_tokens(w.prompts, w.max_tokens)
    assert plan.num_groups == 100
    assert plan.planned_prefill_tokens == 100 * 64 + 400 * 8
    assert plan.saving_ratio == plan.optimal_saving_ratio
    assert plan.plan_s > 0
