"""Test infrastructure: process sessions, loopback servers, fault injection."""
