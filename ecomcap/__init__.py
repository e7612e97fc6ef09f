"""ecomcap."""
