"""Kubernetes delivery: the sidecar injector (CLI and admission webhook) and its manifests.

``inject.py`` is the one pure function both ``dbmtls inject`` and ``dbmtls webhook`` run, so
what a reviewer sees in ``kubectl get pod -o yaml`` after the webhook is exactly what
``dbmtls inject`` prints for the same input.  See docs/kubernetes.md.
"""
