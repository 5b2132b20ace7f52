"""The LMCache MP wire protocol: messages, operation table and frame codec."""
