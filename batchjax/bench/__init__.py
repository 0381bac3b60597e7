"""Side-by-side benchmarks: batchjax's policies next to vLLM and transformers on the same work.

`suite` defines the workloads, `peers` drives the other systems in their own interpreters,
`engine_arm` runs batchjax itself, `report` turns every run into tables, charts and JSON, and
`machine` records where and when it all ran.
"""
