"""Comparison benchmark of the MoE backends: `python -m bench --help`.

Modules: shapes (workload presets and cost model), baselines (bf16 grouped-GEMM MoE, vLLM /
SGLang peers), runners (weights, rotated inputs, fp32 truth, one runner per backend),
harness (CUDA events, graphs, stage breakdown, ceilings, profiling), report (records,
tables, JSON, plot), driver (the GPU run and the no-GPU demo), cli (arguments).
"""
