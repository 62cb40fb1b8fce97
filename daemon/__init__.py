"""lambdaemon: a self-hosted, Lambda-grade function runtime for edge hardware."""

__version__ = "0.1.0"
