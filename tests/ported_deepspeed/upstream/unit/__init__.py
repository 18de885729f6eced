"""A stand-in for DeepSpeed's ``tests/unit`` helpers, so its test files run against stagewise."""
