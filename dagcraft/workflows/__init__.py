"""dagcraft.workflows"""
