"""proxyprefill.protos"""
