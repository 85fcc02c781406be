"""Developer tools: GPU check (gpu_check.py, prepare_gpu.py, gpu_results.py) and test-time compatibility shims."""
