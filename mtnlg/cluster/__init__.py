"""Running training on Kubernetes: Kubeflow Training Operator PyTorchJob manifests."""
