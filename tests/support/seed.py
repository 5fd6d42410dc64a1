"""The seed scenario's DestinationRule, verbatim (paths are replaced by the tests)."""

SEED_DR = """\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: db-mtls
spec:
  host: foo-redis-master
  workloadSelector:
    matchLabels:
      app: redis-client-istio
  trafficPolicy:
    tls:
      mode: MUTUAL
      clientCertificate: /client-certs/tls.crt
      privateKey: /client-certs/tls.key
      caCertificates: /client-certs/ca.crt
"""
