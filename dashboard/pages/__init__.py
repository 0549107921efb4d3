"""Dashboard pages (Streamlit runs each file as a page; this file only makes the folder a
package so that wheels ship it, and Streamlit skips it)."""
