"""dagcraft.orchestrator"""
