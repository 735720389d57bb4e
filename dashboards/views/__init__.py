"""The dashboard's pages, each a Streamlit script that app.py registers with st.Page (not imported as modules;
this file only makes them part of the installed package)."""
