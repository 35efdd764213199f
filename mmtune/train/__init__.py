"""mmtune.train"""
