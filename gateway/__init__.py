"""oidc-gateway: an OpenID Connect reverse-proxy authentication gateway."""

__version__ = "0.1.0"
