"""What analysts read: root-cause clusters, trends and alerts, KPIs, emotion tables, the report."""
