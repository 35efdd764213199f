"""mmtune.select"""
