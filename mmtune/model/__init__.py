"""mmtune.model"""
