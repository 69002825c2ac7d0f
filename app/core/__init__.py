"""The model core, shared by training, the offline scorer and the HTTP service.

Network, preprocessing, exported artifacts, the inference engine and the decision: nothing
here knows about HTTP.
"""
