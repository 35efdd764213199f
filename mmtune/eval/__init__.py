"""mmtune.eval"""
