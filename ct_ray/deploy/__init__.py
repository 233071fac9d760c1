"""Deployment helpers: render the kustomizations of k8s/ and validate manifests offline."""
