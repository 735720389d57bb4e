"""All computation of every stage: plain Python/PyTorch, no Prefect. Importing this package is cheap."""
