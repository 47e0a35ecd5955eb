"""dagcraft.primitives"""
