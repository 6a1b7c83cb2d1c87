from django.contrib import admin
from django.db.models import Count

from access.models import Membership, Team


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    autocomplete_fields = ["user"]


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    """Teams are staff's to make and fill (the model permissions on teams)."""

    list_display = ["name", "description", "members_count", "pipelines_count"]
    search_fields = ["name", "description"]
    filter_horizontal = ["pipelines", "policies"]
    inlines = [MembershipInline]

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        members = Count("memberships", distinct=True)
        return queryset.annotate(members=members, pipelines_n=Count("pipelines", distinct=True))

    @admin.display(description="members", ordering="members")
    def members_count(self, team):
        return team.members

    @admin.display(description="pipelines", ordering="pipelines_n")
    def pipelines_count(self, team):
        return team.pipelines_n
