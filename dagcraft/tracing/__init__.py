"""dagcraft.tracing"""
