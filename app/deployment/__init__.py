"""Deployment tools: the local load balancer and the nginx launcher."""
