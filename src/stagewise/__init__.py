"""stagewise: pipeline-parallel training for PyTorch with DeepSpeed's pipe API."""
