"""Ingress (HTTP webhooks, SMTP) and the REST API: protocols in, pipeline calls out."""
