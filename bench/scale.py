"""stub"""
NOTE = ""
